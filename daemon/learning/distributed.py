"""What changes when the trainer runs as several processes under torchrun (`train.devices` > 1):
joining the process group, each process's share of a step's micro-batches, summing gradients and
loss parts over the processes, and sharding the model (FSDP) for the method that trains every
weight. One process (the default) calls none of the collectives. Knows nothing of what is trained
or how a loss is computed: daemon.learning.train calls these.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from daemon.learning import methods


def world_size() -> int:
    """Processes training together: torchrun's WORLD_SIZE (train.devices), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start() -> int:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); this process's rank (0 alone)."""
    if world_size() == 1:
        return 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def finish() -> None:
    """Leave the process group once every process is done (rank 0 has saved the version)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def summed(values: list[float], device: Any) -> list[float]:
    """`values` summed over every process."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def shards(method: str, world: int) -> bool:
    """Whether the processes shard the model (FSDP) rather than each holding all of it: for the
    method that trains every weight (`full`: its gradients and optimizer state are 3 times the
    model again), when there is more than one process. The others train a small part, and each
    process holding the frozen model is simpler and as fast (their gradients are summed)."""
    return method == "full" and world > 1


def empty_model(folder: str) -> Any:
    """The model of `folder` with no weights in memory (meta tensors; its computed buffers, such as
    rotary frequencies, are real): each process shards it before any weight is read, so none holds
    the whole model, and rank 0 alone reads the weights (`fill`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)


def shard(model: Any, device: Any) -> None:
    """PyTorch's FSDP (fully_shard) on each decoder block and the whole of an `empty_model`: each
    process keeps 1/world of the weights, gradients and optimizer state, and gathers a block's
    weights as it computes it. Its shard is then made on `device` (uninitialised until `fill`)."""
    from torch.distributed.fsdp import fully_shard

    for block in methods.decoder_layers(model):
        fully_shard(block)
    fully_shard(model)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])


def fill(model: Any, folder: str | Path) -> None:
    """Every process's shard of the weights of `folder` (a complete model folder), read by rank 0
    alone (in CPU memory, fp32) and sent to the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def warm_start(model: Any) -> None:
    """Once the base's targets are taken from a sharded `full` model: its parent's weights, on a warm
    start; either way the model is no longer the base from here on."""
    method = methods.of(model)
    if method.parent is not None:
        model.reshard()  # FSDP's root keeps its own weights gathered after a forward pass (the targets')
        fill(model, method.parent)
    method.at_base = False


def full_state(model: Any) -> dict[str, Any]:
    """The sharded model's whole state on rank 0 (in CPU memory; empty elsewhere): every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def share(chunk: list[list[int]], rank: int, world: int, sharded: bool) -> list[list[int] | None]:
    """This process's micro-batches of a step: every world-th. Sharded, each process makes as many
    passes (None: a pass that adds nothing), since a pass gathers weights from all of them."""
    mine: list[list[int] | None] = list(chunk[rank::world])
    if sharded:
        mine += [None] * (math.ceil(len(chunk) / world) - len(mine))
    return mine


def sum_gradients(params: list[Any]) -> None:
    """Each process backpropagated its share of the step's micro-batches: the gradient of the step
    is their sum, as one process would have accumulated it."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def merged_parts(parts: dict[str, list[float]]) -> dict[str, list[float]]:
    """An epoch's loss parts summed over every process (each saw its own micro-batches)."""
    merged: dict[str, list[float]] = {}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, parts)
    for found in gathered:
        for name, (summed, count) in found.items():
            total = merged.setdefault(name, [0.0, 0])
            total[0], total[1] = total[0] + summed, total[1] + count
    return merged


def agreed(value: float) -> float:
    """Rank 0's `value`, so that every process takes the same decision from it."""
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]

"""Training on more than one device through PyTorch's own engine (issue 34): with train.devices > 1
the trainer runs under torchrun, each process taking its share of every step's micro-batches and the
gradients summed, so it takes the steps one process takes. Tested here with 2 gloo processes on the
CPU against 1 process on the same job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from daemon.config import ConfigError, TrainSection, load_settings
from daemon.learning.cycle import trainer_command
from tests.conftest import REPO
from tests.test_methods import job
from tests.tiny import build_tiny_model

TOLERANCE = 0.02  # final loss, relative


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def run_trainer(tiny: Path, folder: Path, method: str, devices: int, parent: Path | None = None,
                version: str = "v0001") -> tuple[dict, list[dict]]:
    """The trainer as a cycle starts it; (its version's meta.json, the progress events it printed)."""
    # sharded (full), the base's side of distillation is precomputed (top-k): so it is alone too
    top_k = {"distill_top_k": 64} if method == "full" else {}
    the_job = job(tiny, folder / "versions", method, version, parent, grad_accum=2, epochs=2, learning_rate=3e-3,
                  **top_k)
    job_file = folder / "job.json"
    job_file.write_text(the_job.model_dump_json())
    done = subprocess.run(trainer_command(job_file, devices, []), capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads((folder / "versions" / version / "meta.json").read_text()), events


def same_weights(first_folder: Path, second_folder: Path) -> None:
    """The weights saved in two version folders agree within TOLERANCE (norm of the difference)."""
    saved = sorted(first_folder.glob("*.safetensors"))
    assert saved
    for path in saved:
        first, second = load_file(path), load_file(second_folder / path.name)
        assert first.keys() == second.keys()
        for name, tensor in first.items():
            assert (second[name].float() - tensor.float()).norm() <= TOLERANCE * tensor.float().norm() + 1e-6, name


@pytest.mark.parametrize("method", ["lora", "expand", "full"])
def test_two_processes_train_what_one_does(tiny: Path, tmp_path: Path, method: str) -> None:
    one, _ = run_trainer(tiny, tmp_path / "one", method, 1)
    two, events = run_trainer(tiny, tmp_path / "two", method, 2)
    alone, together = one["training"], two["training"]
    assert (alone["processes"], together["processes"]) == (1, 2)
    assert (alone["sharded"], together["sharded"]) == (False, method == "full"), "full is sharded (FSDP)"
    assert together["steps"] == alone["steps"] and together["tokens"] == alone["tokens"]
    assert abs(together["last_loss"] - alone["last_loss"]) <= TOLERANCE * alone["last_loss"], (alone, together)
    assert together["losses"] == pytest.approx(alone["losses"], rel=TOLERANCE)
    # the weights rank 0 saved (sharded: gathered from both)
    same_weights(tmp_path / "one" / "versions" / "v0001", tmp_path / "two" / "versions" / "v0001")
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) == together["steps"] and [e["event"] for e in events].count("done") == 1, \
        "one process reports"


def test_a_sharded_warm_start_continues_the_parent(tiny: Path, tmp_path: Path) -> None:
    """Sharded, rank 0 reads the base and then the parent's weights (after the base's targets):
    two processes continue a parent as one does."""
    run_trainer(tiny, tmp_path / "parent", "full", 1)
    parent = tmp_path / "parent" / "versions" / "v0001"
    one, _ = run_trainer(tiny, tmp_path / "one", "full", 1, parent, "v0002")
    two, _ = run_trainer(tiny, tmp_path / "two", "full", 2, parent, "v0002")
    assert two["training"]["sharded"] and two["parent"] == "v0001"
    assert two["training"]["losses"] == pytest.approx(one["training"]["losses"], rel=TOLERANCE)
    assert one["training"]["first_loss"] < json.loads((parent / "meta.json").read_text())["training"]["first_loss"]
    same_weights(tmp_path / "one" / "versions" / "v0002", tmp_path / "two" / "versions" / "v0002")


def test_a_sharded_model_is_built_empty_and_filled_as_the_base(tiny: Path) -> None:
    """No process loads the whole model to shard it: it is built without weights (meta), sharded,
    and its shard filled from rank 0's reading; it then computes what the base computes."""
    from torch.distributed import destroy_process_group, init_process_group
    from transformers import AutoModelForCausalLM

    from daemon.learning import distributed

    model = distributed.empty_model(str(tiny))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in model.buffers()), "computed buffers (rotary) are real"
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)(ids).logits
    init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        distributed.shard(model, "cpu")
        distributed.fill(model, tiny)
        with torch.no_grad():
            assert (model(ids).logits - base).abs().max().item() <= 1e-5
    finally:
        destroy_process_group()


def test_trainer_command_and_its_settings(tmp_path: Path) -> None:
    assert trainer_command(Path("j.json"), 1, [])[1:] == ["-m", "daemon.learning.train", "j.json", "--json-progress"]
    assert trainer_command(Path("j.json"), 2, [])[1:7] == ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                                                           "--standalone", "-m"]
    across = ["--nnodes=2", "--rdzv-endpoint=host0:29400"]
    assert trainer_command(Path("j.json"), 4, across)[5:7] == across
    assert TrainSection(devices=2, grad_accum=4).devices == 2
    config = tmp_path / "config.toml"
    config.write_text("[train]\ndevices = 2\ngrad_accum = 3\n")
    with pytest.raises(ConfigError, match=r"train.grad_accum \(3\) must be a multiple of train.devices \(2\)"):
        load_settings(config)


def test_gloo_is_there() -> None:
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available()
    assert sys.executable


def test_sharded_processes_make_as_many_passes_as_each_other() -> None:
    from daemon.learning.distributed import shards, share

    chunk = [[0, 1], [2, 3], [4]]  # a step's micro-batches: one process takes two, the other one
    assert share(chunk, 0, 2, sharded=False) == [[0, 1], [4]] and share(chunk, 1, 2, sharded=False) == [[2, 3]]
    assert share(chunk, 1, 2, sharded=True) == [[2, 3], None], "a pass that adds nothing, so the gathers pair up"
    assert shards("full", 2) and not shards("full", 1) and not shards("lora", 4) and not shards("expand", 2)

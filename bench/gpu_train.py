"""Trainer tokens/s and MFU on a GPU: cld's own training loop (daemon.learning.train) per method.

    .venv/bin/python bench/gpu_train.py [--models smollm2-135m,tiny] [--methods lora,expand,full]

Prepared for a lent GPU machine (the `device` tool: torch, transformers and peft installed, no
network, no vLLM). cld's trainer needs a few pure-Python packages beyond those; fetch them here
once, then carry them:

    make gpu-wheels                      # var/wheels: pydantic-settings and what it needs
    # on the GPU machine (carry var/wheels), one short run:
    pip install -q --no-index --find-links var/wheels pydantic-settings && python bench/gpu_train.py

Models are built from their configs (bench/gpu_models/*.json: the embedded SmolLM2-135M-Instruct and
Gemma 3 270M) with random weights, and a tiny Llama: tokens/s and FLOPs do not depend on the
weights' values, and no model file has to travel. Data: random token ids in full blocks of
train.seq_len (cld packs its records so). Each method runs `--warmup` steps, then `--steps` timed.

MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s (from its name; --peak-tflops sets
it). Model FLOPs per trained token: 2·N forward, 2·N for the activations' gradients, 2·N_trained for
the weights' gradients (N: the matmul parameters, output head included; LoRA and added blocks train
only theirs), plus attention, 2·layers·seq·width forward (causal) and twice that backward. On a
CPU the tokens/s are printed and MFU is not (no peak to compare with).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import machine  # noqa: E402  (beside this file)

from daemon.config import TrainSection  # noqa: E402
from daemon.learning import methods  # noqa: E402
from daemon.learning.jobs import JobData, TrainJob  # noqa: E402
from daemon.learning.train import Dataset, Example, pick_dtype, train  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "gpu_models"
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "tie_word_embeddings": True}
# Peak dense bf16 tensor FLOP/s by GPU name (vendor data sheets), first match wins.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L4", 121e12), ("A10", 125e12))
METHODS = {"lora": {"rank": 16, "alpha": 32}, "expand": {}, "full": {"learning_rate": 1e-5}}


def model_config(name: str) -> dict:
    return dict(TINY) if name == "tiny" else json.loads((CONFIGS / f"{name}.json").read_text())


def build(config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(config)
    kind = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(kind, dtype=dtype).to(device)


def blocks(vocab: int, seq_len: int, count: int) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (count, seq_len), generator=generator).tolist()
    return [Example(row, list(row)) for row in ids]


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trained) parameters of the linear layers and the output head: what a token multiplies."""
    total = trained = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel()
            trained += module.weight.numel() if module.weight.requires_grad else 0
    return total, trained


def flops_per_token(model: torch.nn.Module, config: dict, seq_len: int) -> float:
    total, trained = matmul_params(model)  # peft's LoRA matrices are Linear modules too
    width = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]) \
        * config["num_attention_heads"]
    attention = 2 * config["num_hidden_layers"] * seq_len * width  # causal: half of the 4·seq·width
    return 2 * total + 2 * total + 2 * trained + 3 * attention


def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def measure(name: str, method: str, args: argparse.Namespace, device: str) -> dict:
    config = model_config(name)
    hyper = TrainSection(method=method, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=1, epochs=1,
                         eval_fraction=0.0, warmup_ratio=0.0, **METHODS[method])
    dtype = pick_dtype(hyper.dtype) if method == "lora" else torch.float32  # as train.load_model chooses
    with tempfile.TemporaryDirectory() as out:
        job = TrainJob(version="v0001", base_model=out, output_dir=out, data=JobData(new=[]), hyper=hyper)
        model = methods.attach(build(config, device, dtype), job)
        data = blocks(config["vocab_size"], args.seq_len, args.batch_size * (args.warmup + args.steps))
        run = lambda examples, steps: train(  # noqa: E731
            job.model_copy(update={"hyper": hyper.model_copy(update={"max_steps": steps})}), model,
            Dataset(examples, [], {}, len(examples) * args.seq_len), 0, json_progress=True, stop=lambda: False)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        run(data[: args.batch_size * args.warmup], args.warmup)
        _sync(device)
        started = time.perf_counter()
        summary = run(data[args.batch_size * args.warmup :], args.steps)
        _sync(device)
        seconds = time.perf_counter() - started
        tokens_s = summary["tokens"] / seconds
        per_token = flops_per_token(model, config, args.seq_len)
        achieved = tokens_s * per_token
        peak = peak_flops(device, args.peak_tflops)
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": name, "method": method, "device": device, "tokens_s": round(tokens_s, 1),
            "flops_per_token": per_token, "tflops": round(achieved / 1e12, 3), "mfu": round(achieved / peak, 4) if peak else None,
            "peak_gib": round(memory, 2) if memory is not None else None, "trained_params": trained,
            "steps": summary["steps"], "seconds": round(seconds, 2), "loss": summary["last_loss"]}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,tiny", help="names in bench/gpu_models, or tiny")
    parser.add_argument("--methods", default="lora,expand,full")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    from daemon.learning import train as recipe

    recipe.emit = lambda event: None  # the trainer's progress events are for the daemon
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else machine.describe()
    rows = [measure(name, method, args, device) for name in args.models.split(",") for method in args.methods.split(",")]
    print(f"\n{where}; torch {torch.__version__}; seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.steps} steps timed after {args.warmup}")
    print("| model | method | trained params | tok/s | model TFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "—"
        memory = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "—"
        print(f"| {row['model']} | {row['method']} | {row['trained_params'] / 1e6:.1f} M | {row['tokens_s']:.0f} "
              f"| {row['tflops']:.2f} | {mfu} | {memory} |")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

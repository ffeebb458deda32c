"""bench/gpu_train.py, prepared for a lent GPU, runs here on the CPU on the tiny config: cld's own
training loop per method, its FLOP count and the peak it compares with."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu_train():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_train", BENCH / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


def test_each_method_trains_and_is_counted(gpu_train, tmp_path: Path) -> None:
    rows = gpu_train.main(["--models", "tiny", "--seq-len", "32", "--batch-size", "2", "--warmup", "1", "--steps", "2",
                           "--json", str(tmp_path / "rows.json")])
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"lora", "expand", "full"} and (tmp_path / "rows.json").is_file()
    assert all(row["steps"] == 2 and row["tokens_s"] > 0 and row["mfu"] is None for row in rows), "no peak on a CPU"
    trained = {method: row["trained_params"] for method, row in by_method.items()}
    assert trained["lora"] < trained["expand"] < trained["full"]
    # a token costs more FLOPs when more weights get gradients (full) or more blocks compute it (expand)
    assert min(by_method["full"]["flops_per_token"], by_method["expand"]["flops_per_token"]) > \
        by_method["lora"]["flops_per_token"]


def test_flops_per_token_and_the_peak_it_is_compared_with(gpu_train, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    config = gpu_train.model_config("tiny")
    model = gpu_train.build(config, "cpu", torch.float32)
    total, trained = gpu_train.matmul_params(model)
    assert total == trained > 0
    attention = 2 * config["num_hidden_layers"] * 64 * config["hidden_size"]
    assert gpu_train.flops_per_token(model, config, 64) == 6 * total + 3 * attention
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert gpu_train.peak_flops("cuda", None) == 989e12 and gpu_train.peak_flops("cpu", None) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 PCIe")
    assert gpu_train.peak_flops("cuda", None) == 756e12 and gpu_train.peak_flops("cuda", 100) == 100e12
    for name in ("smollm2-135m", "gemma3-270m"):
        assert gpu_train.model_config(name)["num_hidden_layers"] > 0

"""Adaptation methods beyond LoRA on a tiny model: MoRA, added blocks, full fine-tuning — each learns,
shows the base on demand, saves a complete model folder that loads on its own and computes what was
trained, and continues its parent on a warm start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from daemon.config import TrainSection
from daemon.learning import methods, train
from daemon.learning.adapters import AdapterError, check_model
from daemon.learning.jobs import JobData, TrainJob
from tests.tiny import build_tiny_model

TEXT = "Zorblat is the capital of the planet Quux, founded in 2071."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def job(tiny: Path, out: Path, method: str, version: str = "v0001", parent: Path | None = None, **hyper) -> TrainJob:
    data = JobData(new=[{"text": TEXT}, {"text": "Quux has three moons."}] * 4,
                   replay=[{"text": "The quick brown fox jumps over the lazy dog."}] * 2)
    settings = {"method": method, "epochs": 3, "seq_len": 32, "batch_size": 2, "learning_rate": 3e-3, "rank": 4,
                "distill_top_k": 0, "dtype": "fp32", **hyper}
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(version=version, base_model=str(tiny), output_dir=str(out), documents=["abc"], data=data,
                    parent_version=parent.name if parent else None, parent_path=str(parent) if parent else None,
                    hyper=TrainSection(**settings))


def logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def base_logits(tiny: Path, tokenizer) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), tokenizer)


def train_and_save(the_job: TrainJob):
    """(model in memory after training, its summary, the saved folder)."""
    model, tokenizer, dtype = train.load_model(the_job)
    dataset = train.build_dataset(the_job, tokenizer)
    summary = train.train(the_job, model, dataset, tokenizer.pad_token_id, json_progress=False, stop=lambda: False)
    return model, tokenizer, summary, train.save(the_job, model, tokenizer, dataset, summary, dtype, 0.0)


# ---- MoRA ---------------------------------------------------------------------------------------

def test_mora_has_the_trainable_numbers_of_the_lora_it_replaces() -> None:
    for d_in, d_out, rank in ((576, 576, 16), (576, 1536, 8), (1536, 576, 16)):
        size = methods.mora_size(d_in, d_out, rank)
        assert size % 2 == 0
        assert abs(size * size - (d_in + d_out) * rank) <= 2 * size + 2, (d_in, d_out, rank, size)


@pytest.mark.parametrize("d_in,d_out,size", [(32, 32, 16), (32, 16, 14), (16, 48, 10)])
def test_a_mora_layer_is_linear_and_merges_into_one_weight(d_in: int, d_out: int, size: int) -> None:
    torch.manual_seed(0)
    layer = methods.MoRALinear(torch.nn.Linear(d_in, d_out, bias=False), size)
    x = torch.randn(3, 5, d_in)
    assert torch.equal(layer(x), layer.base(x)), "an untrained MoRA must not change the layer"
    torch.nn.init.normal_(layer.weight_m)
    assert not torch.allclose(layer(x), layer.base(x))
    assert torch.allclose(layer(x), x @ layer.merged_weight().T, atol=1e-4)


# ---- every merged-weight method ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["mora", "expand", "full"])
def test_a_method_learns_and_saves_a_model_that_computes_what_was_trained(tiny: Path, tmp_path: Path,
                                                                          method: str) -> None:
    from transformers import AutoModelForCausalLM

    model, tokenizer, summary, folder = train_and_save(job(tiny, tmp_path / "versions", method))
    assert summary["last_loss"] < summary["first_loss"], "training did not lower the loss"
    check_model(folder)
    assert not (folder / "adapter_config.json").exists()
    # vLLM loads every *.safetensors at the top of a model folder as the model's weights
    assert [path.name for path in folder.glob("*.safetensors")] == ["model.safetensors"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["method"] == method and meta["trainable_parameters"] == methods.count_trainable(model) > 0
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float32"  # the base's dtype (the tiny model is stored in fp32)
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.allclose(logits(saved, tokenizer), logits(model, tokenizer), atol=1e-4), "the saved model differs"
    with methods.base_view(model):
        assert torch.allclose(logits(model, tokenizer), base_logits(tiny, tokenizer), atol=1e-5), "base view"
    assert not torch.allclose(logits(model, tokenizer), base_logits(tiny, tokenizer), atol=1e-3), "it learned nothing"


@pytest.mark.parametrize("method", ["mora", "expand", "full"])
def test_a_warm_start_continues_the_parent_of_the_same_method(tiny: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "versions"
    _, _, first, parent = train_and_save(job(tiny, out, method, learning_rate=1e-2))
    _, _, child, _ = train_and_save(job(tiny, out, method, version="v0002", parent=parent, epochs=1))
    parent_epochs = [epoch["text_loss"] for epoch in first["epochs"]]
    assert parent_epochs[-1] < parent_epochs[0] - 0.15, parent_epochs
    assert child["epochs"][0]["text_loss"] < (parent_epochs[0] + parent_epochs[-1]) / 2, \
        "the child did not start from what the parent learned"


def test_a_parent_of_another_method_is_not_continued(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "versions"
    _, _, first, parent = train_and_save(job(tiny, out, "full", learning_rate=1e-2))
    _, _, child, folder = train_and_save(job(tiny, out, "mora", version="v0002", parent=parent, epochs=1))
    assert child["first_loss"] == pytest.approx(first["first_loss"], rel=1e-3)
    assert json.loads((folder / "meta.json").read_text())["method"] == "mora"


# ---- added blocks ------------------------------------------------------------------------------

def test_added_blocks_leave_the_model_unchanged_at_step_0_and_alone_train(tiny: Path, tmp_path: Path) -> None:
    the_job = job(tiny, tmp_path, "expand", expand_blocks=2)
    model, tokenizer, _ = train.load_model(the_job)
    assert len(methods.decoder_layers(model)) == 4 and model.config.num_hidden_layers == 4
    assert methods.of(model).added == [1, 3]  # after each of the two base blocks (spread evenly)
    assert torch.allclose(logits(model, tokenizer), base_logits(tiny, tokenizer), atol=1e-5)
    trainable = {name.split(".layers.")[1].split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"1", "3"}
    assert [layer.self_attn.layer_idx for layer in methods.decoder_layers(model)] == [0, 1, 2, 3]


def test_expansion_points_spread_the_blocks_and_refuse_what_does_not_fit() -> None:
    assert methods.expansion_points(30, 2, 0) == [14, 29]
    assert methods.expansion_points(30, 3, 4) == [21, 25, 29]
    with pytest.raises(ValueError, match="does not fit"):
        methods.expansion_points(4, 3, 2)


def test_full_fine_tuning_of_some_blocks_changes_only_them(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, _, _, folder = train_and_save(job(tiny, tmp_path, "full", full_layers=[1]))
    before, after = load_file(str(tiny / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".layers.1." in name for name in changed), changed
    with pytest.raises(ValueError, match="train.full_layers names block 7"):
        train.load_model(job(tiny, tmp_path, "full", full_layers=[7]))


# ---- the rest of cld ---------------------------------------------------------------------------

def test_a_model_folder_without_weights_or_tokenizer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AdapterError, match="tokenizer_config.json is missing; it holds no weights"):
        check_model(tmp_path)

"""Added blocks on the model families users bring (issue 34): on tiny random configs of Llama, Qwen2,
Qwen3, Mistral, Phi-3, Gemma 2 and Gemma 3, an expanded model with its added blocks at their initial
(zeroed) output computes exactly what the base computes — each added block keeps the attention type
(sliding-window or full) of the block it copies, so a model with mixed layers keeps its own attention
pattern — the base view gives the base back, and the saved folder reloads with transformers as the
same model. (Gemma 3's alternating layers were all made sliding-window: |Δlogit| 0.51 at insertion.)
Gemma's added blocks are silenced by their output norms' gains, not their projections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from daemon import model
from daemon.engine.merged import is_merged
from daemon.learning import train
from daemon.learning.methods import Expand
from tests.conftest import REPO
from tests.test_methods import job
from tests.test_methods import logits as text_logits
from tests.tiny import FAMILIES, build_tiny_model

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
TOLERANCE = 1e-4  # fp32


def tiny(family: str) -> torch.nn.Module:
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, name)(**SIZES, pad_token_id=0, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_added_blocks_compute_what_the_base_computes_until_trained(family: str, tmp_path: Path) -> None:
    model = tiny(family)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    base = logits(model, ids)
    types = list(getattr(model.config, "layer_types", None) or [])
    method = Expand.install(model, blocks=2, every=0, parent=None)
    assert len(model.model.layers) == SIZES["num_hidden_layers"] + 2 and method.added
    assert (logits(model, ids) - base).abs().max().item() <= TOLERANCE
    if types:  # each added block has the type of the block it copies, the base's own stay in place
        grown = model.config.layer_types
        assert [t for i, t in enumerate(grown) if i not in method.added] == types
        assert all(grown[i] == grown[i - 1] for i in method.added)
    with method.base_view(model) as viewed:
        assert (logits(viewed, ids) - base).abs().max().item() <= TOLERANCE
        assert getattr(viewed.config, "layer_types", None) in (None, types)
    for p in model.model.layers[method.added[0]].parameters():  # as training would move them
        p.data.add_(0.05 * torch.randn_like(p))
    trained = logits(model, ids)
    model.save_pretrained(tmp_path / "expanded")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "expanded").eval()
    assert (logits(reloaded, ids) - trained).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_an_added_blocks_first_small_step_moves_the_model_a_little(family: str) -> None:
    """Training moves an added block smoothly out of silence: a step of 1e-4 on its weights moves
    the logits about as far on every family. (Gemma's blocks normalise each sublayer's output, so a
    zeroed projection's first step came out at full size: 0.016 here, ten times Llama's 0.0011, and
    Gemma 3 270M's first cycle forgot +5.9 % where SmolLM2's forgets under 2 %.)"""
    model = tiny(family)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    base = logits(model, ids)
    method = Expand.install(model, blocks=2, every=0, parent=None)
    torch.manual_seed(2)
    with torch.no_grad():
        for index in method.added:
            for p in model.model.layers[index].parameters():
                p.add_(1e-4 * torch.randn_like(p))
    assert (logits(model, ids) - base).abs().max().item() <= 0.005


def test_the_first_step_bench_compares_both_ways_of_silencing(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("expand_first_step", REPO / "bench" / "expand_first_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for family in ("llama", "gemma3"):
        build_tiny_model(tmp_path / family, family, layers=4)
    rows = bench.main([str(tmp_path / "llama"), str(tmp_path / "gemma3"), "--steps", "1e-3"])
    ways = {(row["model"], row["silenced by"]): row["max_dlogit"] for row in rows}
    assert set(ways) == {("LlamaForCausalLM", "projections (cld's)"), ("Gemma3ForCausalLM", "projections"),
                         ("Gemma3ForCausalLM", "norm gains (cld's)")}
    assert ways["Gemma3ForCausalLM", "norm gains (cld's)"] < ways["Gemma3ForCausalLM", "projections"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_tested_family_may_be_trained_by_every_method(family: str, tmp_path: Path) -> None:
    tiny(family).save_pretrained(tmp_path)
    assert all(model.method_problem(tmp_path, method) is None for method in ("lora", "expand", "mora", "full"))


def test_an_untested_architecture_is_refused_at_start_naming_what_is_missing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    problem = model.method_problem(tmp_path / "gpt2", "expand")
    assert problem and "tested on LlamaForCausalLM" in problem and "the base model is GPT2LMHeadModel" in problem
    assert 'set train.method = "lora"' in problem and model.method_problem(tmp_path / "gpt2", "lora") is None
    tiny("llama").save_pretrained(tmp_path / "odd")  # a Llama whose blocks lack the projection expand zeroes
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "odd" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "o_proj" not in k}, str(tmp_path / "odd" / "model.safetensors"))
    assert "the base model has no model.layers.0.self_attn.o_proj.weight" in model.method_problem(tmp_path / "odd",
                                                                                                  "expand")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {family: build_tiny_model(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


@pytest.mark.parametrize("method", ["lora", "expand", "mora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains_saves_and_reloads_on_every_family(tiny_models: dict[str, Path], tmp_path: Path,
                                                               family: str, method: str) -> None:
    """cld's own trainer, as a cycle runs it: the loss falls, and the saved version, loaded back
    with transformers (peft for a LoRA), computes what was trained."""
    from peft import PeftModel

    the_job = job(tiny_models[family], tmp_path / "versions", method, learning_rate=1e-2)
    model, tokenizer, dtype = train.load_model(the_job)
    dataset = train.build_dataset(the_job, tokenizer)
    summary = train.train(the_job, model, dataset, tokenizer.pad_token_id, json_progress=False, stop=lambda: False)
    folder = train.save(the_job, model, tokenizer, dataset, summary, dtype, 0.0)
    assert summary["last_loss"] < summary["first_loss"], (family, method, summary["first_loss"], summary["last_loss"])
    trained = text_logits(model, tokenizer)
    if method == "lora":
        base = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32)
        saved = PeftModel.from_pretrained(base, folder)
    else:
        assert is_merged(folder), "a complete model folder"
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if method == "expand":
            assert len(saved.model.layers) == json.loads((tiny_models[family] / "config.json").read_text())[
                "num_hidden_layers"] + the_job.hyper.expand_blocks
    assert (text_logits(saved, tokenizer) - trained).abs().max().item() <= TOLERANCE, "the saved version differs"



def test_a_silencing_gain_learns_at_its_own_scale(tmp_path: Path) -> None:
    """A gain that silences an added block trains at the learning rate times its natural size (the
    copied gain's median): Gemma 3 270M's upper gains are 150-340, and at the plain learning rate a
    cycle's steps moved them by a thousandth of that (nothing learned). Llama's blocks have none."""
    folder = build_tiny_model(tmp_path / "gemma3", "gemma3", layers=4)
    weights = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():  # natural gains of 40, as in a real model's upper blocks
        for layer in weights.model.layers:
            for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
                layer.get_submodule(name).weight.fill_(39.0)  # Gemma's norm multiplies by 1 + w
    weights.save_pretrained(folder)
    the_job = job(folder, tmp_path / "versions", "expand", learning_rate=1e-3, epochs=2)
    loaded, tokenizer, _ = train.load_model(the_job)
    method = train.methods.of(loaded)
    assert sorted(method.lr_scales().values()) == pytest.approx([40.0] * 4)
    summary = train.train(the_job, loaded, train.build_dataset(the_job, tokenizer), tokenizer.pad_token_id,
                          json_progress=False, stop=lambda: False)
    moved = max((1 + p.detach()).abs().max().item() for p in method.lr_scales())
    assert moved > 3 * summary["steps"] * 1e-3, "beyond what the plain learning rate could move it"
    llama = Expand.install(tiny("llama"), blocks=2, every=0, parent=None)
    assert llama.lr_scales() == {}

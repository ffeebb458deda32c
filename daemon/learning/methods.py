"""How a training run adapts the base model (`train.method`), and how the result is saved.

    lora    a peft LoRA on `train.target_modules`; the version folder is a PEFT adapter that vLLM
            loads beside the base.
    mora    MoRA (arXiv 2405.12130): on each target linear layer one trainable square matrix M of
            size r̂, between a fixed compression of the input (r̂-wide blocks, each rotated by its
            index like RoPE: the paper's "type 6") and a fixed decompression (the blocks laid side by
            side, cut or repeated to the output width). r̂ = sqrt((d_in + d_out) · train.rank),
            rounded down to even: as many trainable numbers as a LoRA of that rank, at high rank.
    expand  added decoder blocks (LLaMA Pro, arXiv 2401.02415): `train.expand_blocks` copies of the
            block before them, silent at step 0 so the model is unchanged, one after every
            `train.expand_every` base blocks (0 = spread evenly, the last after the top block);
            only they train, the base stays frozen. A block is silenced where its sublayers'
            outputs end: their output projections zeroed, or, in a block that normalises each
            sublayer's output before adding it (Gemma 2/3), those norms' gains set to give zero (a
            norm would blow a zeroed projection's first small step up to full size).
    full    every weight of the decoder blocks (or only those of `train.full_layers`); embeddings,
            the head and the final norm stay frozen.

LoRA trains in peft's way (frozen base in the compute dtype, adapter in fp32); the others compute
in fp32 (the trainer loads the model so; the weights they train are their own master copy) and are saved as a complete model folder —
merged weights, config, tokenizer — in the base's dtype, which vLLM serves as a model of its own.
Every method can show the base model (`base_view`): the distillation teacher and the benchmarks'
reference. A warm start continues the parent version of the same method; MoRA keeps its matrices
for that in `mora/matrices.safetensors` (in a subfolder: vLLM loads every `*.safetensors` at the top of
a model folder as weights of the model and refuses names it does not know), added blocks are found by their indices in
the parent's meta.json. Knows nothing of jobs' data, the optimiser or serving.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daemon.learning.adapters import read_meta, version_method

log = logging.getLogger("cld.train")

METHODS = ("lora", "mora", "expand", "full")
MORA_FILE = "mora/matrices.safetensors"  # not at the top: vLLM would load it as model weights


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama-like: `model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: train.method 'expand' and 'full' need a "
                         "Llama-like decoder")
    return layers


def count_trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Method:
    """One way of adapting the base; attached to the model it made as `model.cld_method`."""

    merged = False

    def base_view(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        return model.disable_adapter()

    def info(self) -> dict[str, Any]:
        """What meta.json records about the method beyond the job's hyperparameters."""
        return {}

    def lr_scales(self) -> dict[nn.Parameter, float]:
        """Trained parameters that take a multiple of the learning rate (and no weight decay)."""
        return {}

    def save(self, model: Any, tokenizer: Any, folder: Path, dtype: Any) -> None:
        model.save_pretrained(folder, safe_serialization=True)


def of(model: Any) -> Method:
    return getattr(model, "cld_method", None) or Method()


def base_view(model: Any) -> contextlib.AbstractContextManager[Any]:
    """Within it, `model` computes what the base model computes (no grad is assumed by callers)."""
    return of(model).base_view(model)


def attach(model: Any, job: Any, empty: bool = False) -> Any:
    """The model with the job's method in place (and its parent's weights on a warm start); only
    the method's weights require grad. `empty`: the model's weights are not there yet (`full`
    sharded over processes: daemon.learning.distributed fills them in, the parent's after the base's
    targets are taken)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    hp = job.hyper
    parent = Path(job.parent_path) if job.parent_path else None
    if parent is not None and version_method(parent) != hp.method:
        log.warning("the parent %s was trained with train.method %r, this run uses %r: starting from the base",
                    parent.name, version_method(parent), hp.method)
        parent = None
    if hp.method == "lora":
        if parent is not None:
            model = PeftModel.from_pretrained(model, str(parent), is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(
                r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=hp.target_modules,
                use_rslora=hp.use_rslora, bias="none", task_type="CAUSAL_LM"))
        model.cld_method = Method()
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    method: Method
    if hp.method == "mora":
        method = MoRA.install(model, hp.rank, hp.target_modules, parent)
    elif hp.method == "expand":
        method = Expand.install(model, hp.expand_blocks, hp.expand_every, parent)
    elif hp.method == "full":
        method = Full.install(model, hp.full_layers, parent, empty)
    else:
        raise ValueError(f"train.method {hp.method!r} is not one of {', '.join(METHODS)}")
    model.cld_method = method
    return model


def _save_merged(model: Any, tokenizer: Any, folder: Path, dtype: Any, state: dict[str, Any]) -> None:
    """A complete model folder in `dtype` (the base's) with `state` as its weights (a tied output
    head is not stored twice)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    merged = {name: tensor.detach().to(dtype).contiguous() for name, tensor in state.items()
              if not (tied and name == "lm_head.weight")}
    model.save_pretrained(folder, state_dict=merged, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained writes the training dtype (fp32)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(folder)


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(str(shard)))
    if not weights:
        raise ValueError(f"{folder.name} holds no model weights (model*.safetensors)")
    return weights


def _target(name: str, module: nn.Module, targets: str | list[str]) -> bool:
    if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in ("lm_head", "embed_out", "output"):
        return False
    if targets == "all-linear":
        return ".layers." in f".{name}"
    wanted = [targets] if isinstance(targets, str) else targets
    return name.rsplit(".", 1)[-1] in wanted or name in wanted


# ---- MoRA ---------------------------------------------------------------------------------------

def mora_size(d_in: int, d_out: int, rank: int) -> int:
    """Side of the square matrix with (about) the trainable numbers of a rank-`rank` LoRA; even."""
    size = int(math.sqrt((d_in + d_out) * rank) + 0.5) // 2 * 2
    return max(2, min(size, (max(d_in, d_out) + 1) // 2 * 2))


class MoRALinear(nn.Module):
    """A frozen linear layer plus MoRA's update: y = base(x) + decompress(M · compress(x))."""

    def __init__(self, base: nn.Linear, size: int):
        super().__init__()
        self.base, self.size, self.active = base, size, True
        self.weight_m = nn.Parameter(torch.zeros(size, size, dtype=torch.float32, device=base.weight.device))
        blocks = -(-base.in_features // size)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, size, 2, dtype=torch.float32) / size))
        angles = torch.outer(torch.arange(blocks, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [blocks, size]
        self.register_buffer("cos", angles.cos().to(base.weight.device), persistent=False)
        self.register_buffer("sin", angles.sin().to(base.weight.device), persistent=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update alone, in fp32 (linear in x)."""
        size, d_in, d_out = self.size, self.base.in_features, self.base.out_features
        x = x.float()
        pad = (-d_in) % size
        if pad:  # the paper pads by repeating the first features
            x = torch.cat([x, x[..., :pad]], dim=-1)
        blocks = x.reshape(*x.shape[:-1], -1, size)
        half = size // 2
        turned = torch.cat([-blocks[..., half:], blocks[..., :half]], dim=-1)
        blocks = blocks * self.cos + turned * self.sin
        out = (blocks @ self.weight_m.T).reshape(*x.shape[:-1], -1)
        if out.shape[-1] < d_out:
            out = out.repeat(*([1] * (out.dim() - 1)), -(-d_out // out.shape[-1]))
        return out[..., :d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.delta(x).to(y.dtype) if self.active else y

    def merged_weight(self) -> torch.Tensor:
        """W + ΔW in fp32, where ΔWᵀ = the update applied to the identity."""
        with torch.no_grad():
            eye = torch.eye(self.base.in_features, device=self.weight_m.device)
            return self.base.weight.float() + self.delta(eye).T


class MoRA(Method):
    merged = True

    def __init__(self, wrapped: dict[str, MoRALinear]):
        self.wrapped = wrapped

    @classmethod
    def install(cls, model: Any, rank: int, targets: str | list[str], parent: Path | None) -> MoRA:
        chosen = [(name, m) for name, m in model.named_modules() if _target(name, m, targets)]
        if not chosen:
            raise ValueError(f"train.target_modules {targets!r} names no linear layer of the model")
        wrapped = {}
        for name, linear in chosen:
            owner, _, child = name.rpartition(".")
            wrapper = MoRALinear(linear, mora_size(linear.in_features, linear.out_features, rank))
            setattr(model.get_submodule(owner) if owner else model, child, wrapper)
            wrapped[name] = wrapper
        if parent is not None:
            from safetensors.torch import load_file

            saved = load_file(str(parent / MORA_FILE))
            missing = sorted(set(wrapped) - set(saved))
            if missing:
                raise ValueError(f"{parent.name}/{MORA_FILE} has no matrix for {missing[0]} ({len(missing)} missing)")
            for name, wrapper in wrapped.items():
                wrapper.weight_m.data.copy_(saved[name])
        return cls(wrapped)

    @contextlib.contextmanager
    def base_view(self, model: Any) -> Iterator[Any]:
        for wrapper in self.wrapped.values():
            wrapper.active = False
        try:
            yield model
        finally:
            for wrapper in self.wrapped.values():
                wrapper.active = True

    def info(self) -> dict[str, Any]:
        sizes = sorted({w.size for w in self.wrapped.values()})
        return {"mora": {"layers": len(self.wrapped), "sizes": sizes}}

    def save(self, model: Any, tokenizer: Any, folder: Path, dtype: Any) -> None:
        from safetensors.torch import save_file

        state = {}
        for key, tensor in model.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if owner.endswith(".base") and owner[: -len(".base")] in self.wrapped:
                name = owner[: -len(".base")]
                state[f"{name}.{leaf}"] = self.wrapped[name].merged_weight() if leaf == "weight" else tensor
            elif not leaf == "weight_m":
                state[key] = tensor
        _save_merged(model, tokenizer, folder, dtype, state)
        (folder / MORA_FILE).parent.mkdir(exist_ok=True)
        save_file({name: w.weight_m.detach().cpu().contiguous() for name, w in self.wrapped.items()},
                  str(folder / MORA_FILE))


# ---- added blocks -------------------------------------------------------------------------------

def expansion_points(layers: int, blocks: int, every: int) -> list[int]:
    """Indices of the base blocks after which an added block goes."""
    if blocks < 1:
        raise ValueError("train.expand_blocks must be at least 1 for train.method 'expand'")
    every = every or max(1, layers // blocks)
    points = [layers - 1 - k * every for k in range(blocks)]
    if points[-1] < 0:
        raise ValueError(f"train.expand_blocks {blocks} every {every} blocks does not fit in {layers} blocks")
    return sorted(points)


def _renumber(model: Any, layer_types: list[str] | None) -> None:
    """Number the decoder blocks as they now stand, and give the config their attention types
    (sliding-window or full, per block: Gemma 2/3, some Qwen configs) in the same order."""
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = index
    model.config.num_hidden_layers = len(layers)
    if layer_types is not None:
        assert len(layer_types) == len(layers), "one attention type per decoder block"
        model.config.layer_types = list(layer_types)


def _layer_types(model: Any, layers: int) -> list[str] | None:
    """The base's attention type of each decoder block, when its config lists them."""
    types = getattr(model.config, "layer_types", None)
    if types is None:
        return None
    if len(types) != layers:
        raise ValueError(f"the model's config lists {len(types)} layer_types for {layers} decoder blocks")
    return list(types)


OUTPUT_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")  # in a block that has the second
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


def _silence(block: nn.Module) -> dict[str, float]:
    """Make a copied decoder block add nothing to the residual stream, so that the expanded model
    computes what the base computes, in a way training moves smoothly. Where each sublayer's output
    is normalised before it is added (Gemma 2/3: `post_feedforward_layernorm` beside a
    `post_attention_layernorm` that is then a post-norm, not Llama's pre-MLP norm), a zeroed
    projection would not do: the norm scales its first small step up to unit size (by 1/sqrt(eps)
    below it), so the block's gains are set to give zero instead (0 for `x * w`, -1 for Gemma's
    `x * (1 + w)`), found by trying; elsewhere the output projections are zeroed.

    Returns the learning-rate multiplier of each silenced gain (by parameter name in the block):
    AdamW moves every weight about `lr` a step, so a gain whose natural size |g| is large (Gemma
    3 270M's upper blocks: 150-340) would take |g|/lr steps to grow back (a cycle's 190 steps at 1e-3
    learned nothing: NLL drop 7 %, cloze 0/16). Its multiplier |g| (the copied gain's median) moves it
    the same share of its size a step as a unit-sized weight; its first step then moves the model
    about as far as a zeroed projection's first step moves a Llama (bench/expand_first_step.py)."""
    if isinstance(getattr(block, OUTPUT_NORMS[1], None), nn.Module):
        scales = {}
        for name in OUTPUT_NORMS:
            scales[f"{name}.weight"] = max(1.0, _gain_size(block.get_submodule(name)))
            _zero_gain(name, block.get_submodule(name))
        return scales
    for projection in OUTPUT_PROJECTIONS:
        out = block.get_submodule(projection)
        nn.init.zeros_(out.weight)
        if out.bias is not None:
            nn.init.zeros_(out.bias)
    return {}


def _gain_size(norm: nn.Module) -> float:
    """The median size of a norm's per-channel gain, however it stores it (`w` or `1 + w`): its
    output over the normalised input."""
    width = norm.weight.shape[-1]
    probe = torch.ones(1, width, dtype=norm.weight.dtype, device=norm.weight.device)  # already unit RMS
    with torch.no_grad():
        return norm(probe).abs().median().item()


def _zero_gain(name: str, norm: nn.Module) -> None:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter) or getattr(norm, "bias", None) is not None:
        raise ValueError(f"{type(norm).__name__} {name} has no plain gain to set: train.method 'expand' cannot "
                         "add a silent block to this model; use 'lora'")
    probe = torch.randn(2, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        for gain in (0.0, -1.0):
            weight.fill_(gain)
            if norm(probe).abs().max().item() == 0.0:
                return
    raise ValueError(f"{type(norm).__name__} {name} gives no zero output at a gain of 0 or -1: train.method "
                     "'expand' cannot add a silent block to this model; use 'lora'")


class Expand(Method):
    merged = True

    def __init__(self, added: list[int], base_types: list[str] | None = None,
                 grown_types: list[str] | None = None):
        self.added = added  # indices of the added blocks in the expanded model
        self.scaled: dict[nn.Parameter, float] = {}  # learning-rate multipliers (gains that silence a block)
        # each block's attention type, before and after: an added block keeps the one it copies
        self.base_types, self.grown_types = base_types, grown_types

    @classmethod
    def install(cls, model: Any, blocks: int, every: int, parent: Path | None) -> Expand:
        layers = decoder_layers(model)
        if parent is not None:  # the same places as the parent's, and its blocks' weights
            added = sorted(read_meta(parent).get("expand", {}).get("added", []))
            if not added:
                raise ValueError(f"{parent.name}/meta.json does not say which blocks were added")
            points = {index - k - 1 for k, index in enumerate(added)}
        else:
            points = set(expansion_points(len(layers), blocks, every))
        base_types = _layer_types(model, len(layers))
        grown, added, grown_types, scales = [], [], [], {}
        for index, layer in enumerate(layers):
            grown.append(layer)
            grown_types.append(base_types[index] if base_types else "")
            if index in points:
                block = copy.deepcopy(layer)
                scales[len(grown)] = _silence(block)
                added.append(len(grown))
                grown.append(block)
                grown_types.append(grown_types[-1])
        model.model.layers = nn.ModuleList(grown)
        _renumber(model, grown_types if base_types else None)
        if parent is not None:
            with torch.no_grad():
                saved = _load_weights(parent)
                for name, p in model.named_parameters():
                    if any(f".layers.{i}." in name for i in added):
                        p.copy_(saved[name])
        method = cls(added, base_types, grown_types if base_types else None)
        for index in added:
            block = decoder_layers(model)[index]
            for p in block.parameters():
                p.requires_grad_(True)
            method.scaled.update({block.get_parameter(name): scale for name, scale in scales[index].items()})
        return method

    @contextlib.contextmanager
    def base_view(self, model: Any) -> Iterator[Any]:
        grown = decoder_layers(model)
        model.model.layers = nn.ModuleList(layer for i, layer in enumerate(grown) if i not in self.added)
        _renumber(model, self.base_types)
        try:
            yield model
        finally:
            model.model.layers = grown
            _renumber(model, self.grown_types)

    def info(self) -> dict[str, Any]:
        return {"expand": {"added": self.added}}

    def lr_scales(self) -> dict[nn.Parameter, float]:
        return self.scaled

    def save(self, model: Any, tokenizer: Any, folder: Path, dtype: Any) -> None:
        _save_merged(model, tokenizer, folder, dtype, model.state_dict())


# ---- full fine-tuning ---------------------------------------------------------------------------

class Full(Method):
    merged = True

    def __init__(self, trained: dict[str, nn.Parameter], base: dict[str, torch.Tensor], parent: Path | None = None):
        self.trained, self.base = trained, base
        # `empty` (sharded): no base copy is kept; the model is the base until the parent's weights
        # (`parent`) or training move it, and only then is its base view taken
        self.parent, self.at_base = parent, not base

    @classmethod
    def install(cls, model: Any, only: list[int], parent: Path | None, empty: bool = False) -> Full:
        layers = decoder_layers(model)
        bad = [i for i in only if not 0 <= i < len(layers)]
        if bad:
            raise ValueError(f"train.full_layers names block {bad[0]}, the model has {len(layers)}")
        chosen = [layers[i] for i in (only or range(len(layers)))]
        trained: dict[str, nn.Parameter] = {}
        names = {id(p): n for n, p in model.named_parameters()}
        for block in chosen:
            for p in block.parameters():
                p.requires_grad_(True)
                trained[names[id(p)]] = p
        if empty:
            return cls(trained, {}, parent)
        base = {name: p.detach().clone() for name, p in trained.items()}
        if parent is not None:  # the base's weights were loaded: continue from the parent's
            saved = _load_weights(parent)
            with torch.no_grad():
                for name, p in trained.items():
                    p.copy_(saved[name])
        return cls(trained, base)

    @contextlib.contextmanager
    def base_view(self, model: Any) -> Iterator[Any]:
        if not self.base:
            if not self.at_base:
                raise RuntimeError("a sharded full fine-tune keeps no copy of the base: its base view is only "
                                   "there before the parent's weights and training")
            yield model
            return
        for name, p in self.trained.items():  # swap the tensors, not their values: O(1) each way
            p.data, self.base[name] = self.base[name], p.data
        try:
            yield model
        finally:
            for name, p in self.trained.items():
                p.data, self.base[name] = self.base[name], p.data

    def info(self) -> dict[str, Any]:
        blocks = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in self.trained})
        return {"full": {"blocks": blocks}}

    def save(self, model: Any, tokenizer: Any, folder: Path, dtype: Any, state: dict[str, Any] | None = None) -> None:
        _save_merged(model, tokenizer, folder, dtype, model.state_dict() if state is None else state)

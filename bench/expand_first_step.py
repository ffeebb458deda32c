"""How far the first training step on freshly added blocks (`train.method = "expand"`) moves a
real model, silenced either way: by zeroed output projections (LLaMA Pro's way) or, in a block that
normalises its sublayers' outputs (Gemma 2/3), by those norms' gains (cld's way there).

    .venv/bin/python bench/expand_first_step.py MODEL_FOLDER [MODEL_FOLDER ...] [--steps 1e-4 1e-3]

For each model folder (a prepared base: `state/model`) and each step size, the added blocks
(`train.expand_blocks`' default, 2, spread evenly) are inserted, checked to leave the model's NLL
unchanged, and every weight of theirs moved by ±step (the size of AdamW's first step at that learning
rate; a gain that silences a block, its learning-rate multiple of it, as the trainer gives it); then
the NLL of a plain English paragraph and the largest logit change are printed, as Markdown rows
for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from daemon.learning.methods import OUTPUT_NORMS, OUTPUT_PROJECTIONS, Expand  # noqa: E402

TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
        "members agreed to fund the new library wing and to postpone the road repairs until spring. "
        "The mayor said the decision reflected what residents had asked for at the public hearings.")


def measure(folder: Path, silence: str, step: float) -> dict | None:
    """NLL before and after one step on the added blocks; None where `silence` is cld's own way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(ids, labels=ids)
    method = Expand.install(model, blocks=2, every=0, parent=None)
    added, scaled = method.added, method.lr_scales()
    layers = model.model.layers
    normed = isinstance(getattr(layers[0], OUTPUT_NORMS[1], None), torch.nn.Module)
    if silence == "projections" and not normed:
        silence = "projections (cld's)"
    elif silence == "projections":  # undo cld's gains, zero the projections instead
        with torch.no_grad():
            for index in added:
                for name in OUTPUT_NORMS:
                    layers[index].get_submodule(name).weight.copy_(layers[index - 1].get_submodule(name).weight)
                for name in OUTPUT_PROJECTIONS:
                    layers[index].get_submodule(name).weight.zero_()
    elif not normed:
        return None
    else:
        silence = "norm gains (cld's)"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert abs(model(ids, labels=ids).loss.item() - before.loss.item()) < 1e-4, "not silent at insertion"
        for index in added:
            for p in layers[index].parameters():  # a gain that silences a block takes its multiple of the step
                size = step * scaled.get(p, 1.0) if silence != "projections" else step
                p.add_(size * torch.sign(torch.randn(p.shape, generator=generator)))
        after = model(ids, labels=ids)
    return {"model": model.config.architectures[0], "silenced by": silence,
            "step": step, "nll": (before.loss.item(), after.loss.item()),
            "max_dlogit": (after.logits - before.logits).abs().max().item()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--steps", nargs="+", type=float, default=[1e-4, 1e-3])
    args = parser.parse_args(argv)
    rows = [row for folder in args.models for silence in ("projections", "gains") for step in args.steps
            if (row := measure(folder, silence, step)) is not None]
    print("| model | silenced by | step | NLL before → after | max abs Δlogit |\n|---|---|---|---|---|")
    for row in rows:
        (first, last), change = row["nll"], (row["nll"][1] - row["nll"][0]) / row["nll"][0]
        print(f"| {row['model']} | {row['silenced by']} | {row['step']:g} | {first:.3f} → {last:.3f} ({change:+.1%}) "
              f"| {row['max_dlogit']:.3f} |")
    return rows


if __name__ == "__main__":
    main()

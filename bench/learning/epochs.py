"""How recall and forgetting move epoch by epoch in one training job: which stop rule to trust.

    .venv/bin/python bench/learning/epochs.py JOB.json --document NAME [--replay STATE/replay] [--epochs 10]

Trains the job (a cycle's `state/jobs/vNNNN.json`, e.g. from `make bench-learning`) with its own
recipe, in this process and without saving, and after every epoch prints what the trainer saw
(the text's top-1 accuracy and loss, the distillation loss) beside what the benchmark measures:
exact cloze and QA recall of the document's facts (`documents.json`, greedy, transformers instead
of vLLM) and the NLL of held-out replay passages against the base. Used to choose
`train.stop_accuracy` (docs/BENCHMARKS.md, "Knowledge latency").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent)]

import measure  # noqa: E402  (beside this file)
import torch  # noqa: E402

from daemon.learning import methods  # noqa: E402
from daemon.learning import train as recipe  # noqa: E402
from daemon.learning.jobs import load_job  # noqa: E402


def greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def recall(model: Any, tokenizer: Any, document: measure.Document) -> tuple[float, float]:
    facts = document.facts
    cloze = greedy(model, tokenizer, [tokenizer(f.prompt, add_special_tokens=False)["input_ids"] for f in facts], 24)
    questions = [recipe.render_chat(tokenizer, [{"role": "user", "content": f.question}], generation_prompt=True)
                 for f in facts]
    replies = greedy(model, tokenizer, questions, measure.QA_MAX_TOKENS)
    return (statistics.fmean(measure.cloze_exact(f.answer, c) for f, c in zip(facts, cloze)),
            statistics.fmean(measure.contains(f.qa_answer, r) for f, r in zip(facts, replies)))


def nll(model: Any, tokenizer: Any, texts: list[str]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:256]])
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    return total / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("--document", required=True, help="name of the job's document in documents.json")
    parser.add_argument("--replay", type=Path, help="the run's replay folder: held-out passages for forgetting")
    parser.add_argument("--passages", type=int, default=32)
    parser.add_argument("--epochs", type=int, help="override the job's epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train.* setting of the job (e.g. learning_rate=5e-4)")
    args = parser.parse_args()

    job = load_job(args.job)
    if args.epochs:
        job.hyper.epochs = args.epochs
    if args.set:
        overrides = dict(item.split("=", 1) for item in args.set)
        job.hyper = type(job.hyper).model_validate({**job.hyper.model_dump(), **overrides})
    job.hyper.stop_accuracy = 0.0  # every epoch is measured
    document = next(d for d in measure.load_documents()[0] if d.name == args.document)
    held_out: list[str] = []
    if args.replay:
        from replay.buffer import ReplayBuffer

        buffer = ReplayBuffer.open(args.replay)
        held_out = [p.text for p in buffer.held_out_passages(args.passages, seed=0)]
        buffer.close()

    model, tokenizer, _ = recipe.load_model(job)
    dataset = recipe.build_dataset(job, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with methods.base_view(model):
        model.eval()
        base_nll = nll(model, tokenizer, held_out) if held_out else None
    rows, started = [], time.monotonic()

    def on_epoch(epoch: int, report: dict[str, float]) -> bool:
        model.eval()
        cloze, qa = recall(model, tokenizer, document)
        forgetting = (nll(model, tokenizer, held_out) - base_nll) / base_nll if base_nll else None
        model.train()
        rows.append({"epoch": epoch, **report, "cloze": cloze, "qa": qa, "held_out_delta": forgetting,
                     "train_s": round(time.monotonic() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
        return False

    summary = recipe.train(job, model, dataset, pad_id, json_progress=False, stop=lambda: False, on_epoch=on_epoch)
    print("| epoch | text top-1 | text loss | distill KL | cloze (exact) | QA | held-out NLL Δ |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        delta = "—" if row["held_out_delta"] is None else f"{row['held_out_delta']:+.1%}"
        print(f"| {row['epoch']} | {row.get('text_accuracy', 0):.3f} | {row.get('text_loss', 0):.3f} | "
              f"{row.get('distill_loss', 0):.4f} | {row['cloze']:.0%} | {row['qa']:.0%} | {delta} |")
    print(f"steps {summary['steps']}, teacher {summary['teacher_s']} s")


if __name__ == "__main__":
    main()

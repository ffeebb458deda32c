"""Open-book QA: how many of the benchmark's questions the base model answers with the document in
front of it — the ceiling of any method that teaches the model its own open-book answers (context
distillation, self-generated QA: issue 16), measured before building one.

    .venv/bin/python bench/learning/open_book.py var/model [--out open-book.json]

For every benchmark document (the invented ones and the real READMEs) each fact's question is asked
twice, greedy, by the same scoring rule as the benchmarks (`measure.contains`): closed book (the
question alone, as the benchmarks ask it) and open book (the document, then the question, in one
user turn). Computed with transformers on the CPU (`sweep.Scorer`), no daemon needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]

import measure  # noqa: E402
import sweep  # noqa: E402

from daemon.learning.augment import OPEN_BOOK  # noqa: E402  (the prompt context distillation learns from)


def open_book_prompt(document: str, question: str) -> str:
    return OPEN_BOOK.format(document=document.strip(), question=question)


def measure_documents(scorer: sweep.Scorer, documents: list[measure.Document]) -> list[dict]:
    rows = []
    for doc in documents:
        closed = scorer.chat([f.question for f in doc.facts], measure.QA_MAX_TOKENS)
        opened = scorer.chat([open_book_prompt(doc.text, f.question) for f in doc.facts], measure.QA_MAX_TOKENS)
        rows.append({"document": doc.name, "words": len(doc.text.split()),
                     "closed": statistics.fmean(measure.contains(f.qa_answer, r) for f, r in zip(doc.facts, closed)),
                     "open": statistics.fmean(measure.contains(f.qa_answer, r) for f, r in zip(doc.facts, opened)),
                     "answers": [{"question": f.question, "expected": f.qa_answer, "open_book": r}
                                 for f, r in zip(doc.facts, opened)]})
        print(f"{doc.name}: closed {rows[-1]['closed']:.0%}, open {rows[-1]['open']:.0%}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, default=Path("open-book.json"))
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    invented, _ = measure.load_documents()
    real, _ = measure.load_documents(HERE / "real_documents.json")
    scorer = sweep.Scorer(model, tokenizer, batch=8)
    rows = measure_documents(scorer, invented + real)
    args.out.write_text(json.dumps(rows, indent=1))
    for label, group in (("invented", rows[:len(invented)]), ("real", rows[len(invented):])):
        print(f"{label} ({len(group)} documents): closed book {statistics.fmean(r['closed'] for r in group):.0%}, "
              f"open book {statistics.fmean(r['open'] for r in group):.0%}")
    print(f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {args.model}")


if __name__ == "__main__":
    main()

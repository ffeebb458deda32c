"""What each cycle of a run trained on, in tokens, beside what the gate measured of it: the new
documents' chunks and their forms, earlier documents' knowledge replay (chunks and forms), the
base's own text (corpus passages) and behaviour rehearsal — and the corpus's share of it all.

    .venv/bin/python bench/learning/composition.py var/bench-learning/lifelong/RUN [--state DIR]

Reads the daemon's job files (`state/jobs/v*.json`) and cycle records; counts tokens with the run's
base tokenizer. Prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from daemon.ingestion.chunking import record_text  # noqa: E402

KINDS = {"new": "new chunks", "augmented": "their forms", "knowledge": "knowledge (chunks + forms)",
         "corpus": "corpus", "rehearsal": "rehearsal"}


def composition(job: dict, count) -> dict[str, int]:
    """Tokens of each kind of training record in a job."""
    data = job["data"]
    tokens = {kind: 0 for kind in KINDS}
    for kind in ("new", "augmented", "knowledge", "rehearsal"):
        tokens[kind] += sum(count(record_text(r)) for r in data.get(kind, []))
    for record in data.get("replay", []):  # corpus passages, earlier documents' chunks and forms, rehearsal
        kind = record.get("kind", "corpus")
        tokens[kind if kind in tokens else "corpus"] += count(record_text(record))
    return tokens


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder of bench/learning (with state/) or a state folder")
    args = parser.parse_args(argv)
    state = args.run / "state" if (args.run / "state").is_dir() else args.run
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(state / "model")
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    records = {}
    for path in sorted((state / "cycles").glob("*.json")):
        cycle = json.loads(path.read_text(encoding="utf-8"))
        if cycle.get("version"):
            records[cycle["version"]] = cycle
    rows = []
    print("| version | " + " | ".join(KINDS.values()) + " | corpus share | forgetting vs base | vs serving | decision |")
    print("|---" * (len(KINDS) + 5) + "|")
    for path in sorted((state / "jobs").glob("v*.json")):
        job = json.loads(path.read_text(encoding="utf-8"))
        tokens = composition(job, count)
        cycle = records.get(job["version"], {})
        results = (cycle.get("probes") or {}).get("results") or {}
        row = {"version": job["version"], **tokens, "share": tokens["corpus"] / max(1, sum(tokens.values())),
               "forgetting_vs_base": results.get("forgetting_vs_base"),
               "forgetting_vs_incumbent": results.get("forgetting_vs_incumbent"),
               "decision": cycle.get("decision") or cycle.get("state")}
        rows.append(row)
        pct = lambda v: "" if v is None else f"{v:+.1%}"  # noqa: E731
        print(f"| {row['version']} | " + " | ".join(f"{tokens[k]:,}" for k in KINDS) + f" | {row['share']:.0%} | "
              f"{pct(row['forgetting_vs_base'])} | {pct(row['forgetting_vs_incumbent'])} | {row['decision']} |")
    return rows


if __name__ == "__main__":
    main()

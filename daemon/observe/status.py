"""The status object (`cld status --json`, `GET /api/status`), gathered from the state directory.

Owns the shape of the status JSON (the contract in README "Observe") and its view at a glance for `cld status`
(rich). Works whether or not the daemon runs: the parts only a running daemon knows (vLLM's
state) are passed in by it. Knows nothing of HTTP.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from daemon.config import Settings
from daemon.engine.router import Router
from daemon.ingestion import journal
from daemon.layout import CYCLES_DIR, StateDir
from daemon.learning.adapters import adapters_view
from daemon.learning.decide import RULE_OF, passes, thresholds
from daemon.learning.records import CycleStore
from daemon.learning.replay_plan import progress_line
from daemon.learning.replay_plan import summary as replay_summary
from daemon.model import model_name
from replay.durable import read_json

RECENT_CYCLES = 20
RECENT_IN_TABLE = 8


def collect(settings: Settings, daemon: dict[str, Any] | None = None) -> dict[str, Any]:
    """Status from the state directory; `daemon` is the live part a running daemon adds."""
    state = StateDir(settings.state.dir)
    router = Router(settings.serve.model_name, settings.serve.base_name, state.serving)
    return {
        "model": {
            "base": model_name(settings.model.base),
            "served_name": settings.serve.model_name,
            "current_adapter": router.current.version if router.current else None,
        },
        "documents": journal.counts(state.journal),
        "replay": replay_summary(settings),
        "adapters": adapters(settings),
        "cycles": [record.summary() for record in CycleStore(state.root / CYCLES_DIR).all()[-RECENT_CYCLES:]],
        "thresholds": asdict(thresholds(settings.probes)),
        "daemon": daemon or {"running": False},
    }


def adapters(settings: Settings) -> list[dict[str, Any]]:
    """Every adapter version with lineage, documents, probe results and state."""
    state = StateDir(settings.state.dir)
    router = Router(settings.serve.model_name, settings.serve.base_name, state.serving)
    return adapters_view(state.adapters, CycleStore(state.root / CYCLES_DIR),
                         router.current.version if router.current else None)


def running_daemon(state: StateDir) -> dict[str, Any] | None:
    """The record a running daemon keeps in the state directory, or None when none runs."""
    record = read_json(state.daemon)
    if not record or not _alive(int(record.get("pid", 0))):
        return None
    return record


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The key probe numbers `cld status` shows per cycle: (probe, column title).
KEY_PROBES = (("forgetting_vs_base", "forgetting"), ("behaviour_increase", "behaviour"),
              ("nll_drop", "NLL drop"), ("cloze_pass", "cloze"), ("knowledge_kept", "kept"),
              ("closed_book", "answered"), ("open_book", "open book"))
SHARES = ("cloze_pass", "knowledge_kept", "closed_book", "open_book")  # shown as plain percentages, not changes
OUTCOME_STYLES = {"promoted": "bold green", "rejected": "red", "failed": "bold red", "skipped": "dim",
                  "running": "bold yellow"}


def render(status: dict[str, Any], now_s: float | None = None) -> Group:
    """Human-readable status (rich): a few lines at a glance, then the last cycles with their key
    probe numbers; values over their threshold in red."""
    model, docs, daemon = status["model"], status["documents"], status["daemon"]
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("daemon", _daemon_line(daemon, now_s or time.time()))
    facts.add_row("model", Text.assemble((model["served_name"], "bold"), " = ",
                                         (model["current_adapter"] or "base", "bold cyan"), f"   (base {model['base']})"))
    facts.add_row("documents", f"{docs['ingested']} ingested · {docs['pending']} pending ({docs.get('ready', 0)} "
                  f"ready) · {docs['learned']} learned · {docs['quarantined']} quarantined · "
                  f"{docs.get('duplicates', 0)} duplicates")
    if docs.get("set_aside"):
        facts.add_row("set aside", Text(f"{docs['set_aside']} document{'s' * (docs['set_aside'] != 1)} refused in "
                                        "too many cycles (`cld retry --list` says why)", style="bold yellow"))
    if daemon.get("ingest_error"):
        facts.add_row("intake", Text(f"failing: {daemon['ingest_error']}", style="bold red"))
    if daemon.get("degraded"):
        facts.add_row("health", Text(f"{daemon['degraded']}: requests to {model['served_name']} get 503",
                                     style="bold red"))
    if daemon.get("fallback"):
        facts.add_row("fallback", Text(fallback_line(daemon["fallback"]), style="bold yellow"))
    facts.add_row("replay", replay_line(status["replay"]))
    if daemon.get("recall"):
        facts.add_row("recall", recall_line(daemon["recall"]))
    facts.add_row("adapters", _adapters_line(status["adapters"]))
    running = [c for c in status["cycles"] if c["state"] == "running"]
    if running:
        facts.add_row("now", Text(f"cycle {running[-1]['id']} {cycle_line(running[-1])}", style="yellow"))
    return Group(facts, _cycles_table(status, now_s or time.time()))


def fallback_line(fallback: dict[str, Any]) -> str:
    """The last time the base had to serve instead of a version that could not be served."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(fallback["at"]))
    return (f"{fallback['version']} could not be served ({fallback['reason']}); the base serves since {when} "
            f"(`cld rollback {fallback['version']}` once it can)")


def _daemon_line(daemon: dict[str, Any], now_s: float) -> Text:
    if not daemon.get("running"):
        return Text("not running", style="bold red")
    up = f", up {span(now_s - daemon['started_at'])}" if daemon.get("started_at") else ""
    phase = daemon.get("phase", "?")
    restarts = daemon.get("vllm_restarts", 0)
    own = "".join(f" · {i['version']} on its own server (slot {i['slot']}, {i['state']})"
                  for i in daemon.get("merged_instances") or [])
    return Text.assemble(f"running (pid {daemon['pid']}{up}) at {daemon['url']} · ",
                         (phase, "bold green" if phase == "serving" else "bold yellow"),
                         f" · model server {daemon.get('vllm', '?')}, {restarts} restart{'s' * (restarts != 1)}{own}")


def _cycles_table(status: dict[str, Any], now_s: float) -> Table:
    table = Table(title="last cycles", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    for title, justify in (("cycle", "right"), ("ended", "right"), ("outcome", "left"), ("version", "left"),
                           *((name, "right") for _, name in KEY_PROBES), ("why", "left")):
        table.add_column(title, justify=justify, overflow="fold")
    probes = {a["version"]: a.get("probes") or {} for a in status["adapters"]}
    limits = status.get("thresholds") or {}
    for cycle in status["cycles"][-RECENT_IN_TABLE:]:
        measured = probes.get(cycle.get("version"), {})
        ended = f"{span(now_s - cycle['finished_at'])} ago" if cycle.get("finished_at") else "-"
        values = [_probe_cell(probe, measured, limits) for probe, _ in KEY_PROBES]
        table.add_row(str(cycle["id"]), ended, Text(cycle["state"], style=OUTCOME_STYLES.get(cycle["state"], "")),
                      cycle.get("version") or "-", *values, _why(cycle))
    return table


def _probe_cell(probe: str, measured: dict[str, Any], limits: dict[str, float]) -> Text:
    value, items = measured.get(probe), item_count(probe, measured)
    if value is None:
        return Text("-", style="dim")
    shown = f"{value:.0%}" if probe in SHARES else f"{value:+.1%}"
    if items:
        shown = f"{round(value * items)}/{items}"
    return Text(shown, style="red" if passes(probe, measured, limits) is False else "")


def item_count(probe: str, measured: dict[str, Any]) -> int | None:
    """How many discrete items a probe's value is a share of (its rule's `items`), None for the others."""
    rule = RULE_OF.get(probe)
    return measured.get(rule.items) if rule and rule.items else None


def failed_reasons(cycle: dict[str, Any]) -> list[str]:
    """The reasons of the checks that failed a candidate (`daemon.learning.decide` records them)."""
    return [failure["reason"] for failure in cycle.get("failed") or []]


def _why(cycle: dict[str, Any]) -> str:
    """The failed checks of a rejected cycle, the error of a failed one, the reason of a skipped one."""
    if cycle.get("error"):
        return cycle["error"]
    if cycle["state"] == "rejected":
        return "\n".join(failed_reasons(cycle))
    return "\n".join(cycle.get("reasons") or []) if cycle["state"] != "promoted" else ""


def span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def replay_line(replay: dict[str, Any]) -> str:
    building = progress_line(replay.get("building"))
    if not replay["source"]:
        return f"building: {building}" if building else "not built yet"
    built = f"{replay['passages']} passages ({replay['held_out']} held out), {replay['source']} corpus"
    return f"{built}; updating: {building}" if building else built


def recall_line(recall: dict[str, Any]) -> str:
    """ "412 passages of 9 documents · 30 of 41 requests recalled (14.2 ms each)": the running daemon's."""
    if not recall.get("enabled"):
        return "off (recall.enabled = false)"
    asked = recall.get("requests") or {}
    spent = f" ({recall['mean_ms']} ms each)" if recall.get("mean_ms") is not None else ""
    return (f"{recall['passages']} passages of {recall['documents']} documents · {asked.get('recalled', 0)} of "
            f"{sum(asked.values())} requests recalled{spent}")


def _adapters_line(adapters: list[dict[str, Any]]) -> str:
    if not adapters:
        return "none yet"
    states = [a["state"] for a in adapters]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    return f"{len(adapters)} versions ({counts})"


def cycle_line(cycle: dict[str, Any]) -> str:
    version = f" {cycle['version']}" if cycle.get("version") else ""
    if cycle["state"] == "running":
        progress = cycle.get("progress") or {}
        step = f" step {progress['step']}/{progress['steps']}" if "step" in progress else ""
        eta = progress.get("eta_s") if cycle["stage"] == "train" else None
        left = f", about {max(1, round(eta / 60))} min left" if eta is not None else ""
        return f"running{version}: {cycle['stage']}{step}{left}"
    why = cycle.get("error") or "; ".join(cycle.get("reasons") or [])
    return f"{cycle['state']}{version} ({cycle['trigger']}){': ' + why if why else ''}"

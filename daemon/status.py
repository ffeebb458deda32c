"""The status object (`cld status --json`, `GET /api/status`), gathered from the state directory.

Owns the shape of the status JSON (see DESIGN.md). Works whether or not the daemon runs: the
parts only a running daemon knows (vLLM's state) are passed in by it. Knows nothing of HTTP.
"""

from __future__ import annotations

import os
from typing import Any

from daemon import journal
from daemon.config import Settings
from daemon.layout import CYCLES_DIR, StateDir, read_json
from daemon.model import model_name
from daemon.replaybuf import summary as replay_summary
from daemon.cycle import adapters_view
from daemon.cycles import CycleStore
from daemon.serving import Router

RECENT_CYCLES = 20


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
        "daemon": daemon or {"running": False},
    }


def adapters(settings: Settings) -> list[dict[str, Any]]:
    """Every adapter version with lineage, documents, probe results and state."""
    state = StateDir(settings.state.dir)
    router = Router(settings.serve.model_name, settings.serve.base_name, state.serving)
    return adapters_view(state, CycleStore(state.root / CYCLES_DIR), router.current.version if router.current else None)


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


def render(status: dict[str, Any]) -> str:
    """Human-readable status, a few lines at a glance."""
    model, docs, daemon = status["model"], status["documents"], status["daemon"]
    if daemon.get("running"):
        vllm = daemon.get("vllm", "?")
        where = f"running (pid {daemon['pid']}) at {daemon['url']}; model server: {vllm}"
    else:
        where = "not running"
    lines = [
        f"daemon     {where}",
        f"model      {model['served_name']} = {model['current_adapter'] or 'base'}  (base: {model['base']})",
        f"documents  {docs['ingested']} ingested, {docs['pending']} pending, "
        f"{docs['learned']} learned, {docs['quarantined']} quarantined, {docs.get('duplicates', 0)} duplicates",
        f"replay     {_replay_line(status['replay'])}",
        f"adapters   {_adapters_line(status['adapters'])}",
    ]
    lines += [f"cycle {c['id']:<4} {cycle_line(c)}" for c in status["cycles"][-5:]]
    return "\n".join(lines)


def _replay_line(replay: dict[str, Any]) -> str:
    if not replay["source"]:
        return "not built yet"
    return f"{replay['passages']} passages ({replay['held_out']} held out), {replay['source']} corpus"


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
        return f"running{version}: {cycle['stage']}{step}"
    why = cycle.get("error") or "; ".join(cycle.get("reasons") or [])
    return f"{cycle['state']}{version} ({cycle['trigger']}){': ' + why if why else ''}"

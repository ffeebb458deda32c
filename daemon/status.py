"""The status object (`cld status --json`, `GET /api/status`), gathered from the state directory.

Owns the shape of the status JSON (see DESIGN.md). Works whether or not the daemon runs: the
parts only a running daemon knows (vLLM's state) are passed in by it. Knows nothing of HTTP.
"""

from __future__ import annotations

import os
from typing import Any

from daemon.config import Settings
from daemon.layout import StateDir, read_json
from daemon.model import model_name
from daemon.serving import Router


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
        "documents": {"ingested": 0, "pending": 0, "quarantined": 0, "learned": 0},
        "replay": {"source": None, "passages": 0, "held_out": 0},
        "adapters": [],
        "cycles": [],
        "daemon": daemon or {"running": False},
    }


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
        f"{docs['learned']} learned, {docs['quarantined']} quarantined",
        f"adapters   {len(status['adapters'])} versions",
    ]
    return "\n".join(lines)

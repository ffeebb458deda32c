"""File names of the replay folder, the manifest's format, the build's lock and exit code.

Owns the names of everything under the replay folder (`<state>/replay/`) and how the published
manifest is recognised. Knows nothing of what the files hold; the write discipline is
`replay.durable`'s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from replay.durable import atomic_write_json, exclusive_lock, lock_held, read_json

MANIFEST_FILE = "manifest.json"
PASSAGES_FILE = "passages.sqlite3"
EMBEDDINGS_FILE = "embeddings.f32"
INDEX_SUFFIX = ".faiss"
SYNTHETIC_DIR = "synthetic"
SYNTHETIC_CORPUS_FILE = "corpus.jsonl"
SYNTHETIC_META_FILE = "meta.json"
SYNTHETIC_PARTIAL_FILE = "partial.json"  # how far a synthesis stopped part way got
REHEARSAL_FILE = "rehearsal.json"
PROGRESS_FILE = "progress.json"  # while a build runs: its stage and how far it is
LOCK_FILE = "build.lock"
MANIFEST_FORMAT = 1
STOPPED_EXIT_CODE = 3  # `python -m replay.build` was asked to stop; the next build resumes


class BuildLocked(RuntimeError):
    """Another process is building this replay folder."""


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The published buffer's manifest, or None when there is none (or it is unreadable: the
    next build replaces it)."""
    data = read_json(folder / MANIFEST_FILE, lenient=True)
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def report_progress(folder: Path, stage: str, done: int, total: int) -> None:
    """Say how far the running build is (`cld status`, /status and systemd's status line show it)."""
    found = read_json(folder / PROGRESS_FILE, lenient=True) or {}
    started = found.get("started_at") if found.get("stage") == stage else time.time()
    atomic_write_json(folder / PROGRESS_FILE, {"stage": stage, "done": done, "total": total,
                                               "started_at": started, "updated_at": time.time()})


def read_progress(folder: Path) -> dict[str, Any] | None:
    """The running build's progress with an `eta_s` estimate, or None when none is under way (a
    build that was killed leaves its file, but not its lock)."""
    if not lock_held(folder / LOCK_FILE):
        return None
    found = read_json(folder / PROGRESS_FILE, lenient=True)
    if not isinstance(found, dict) or not {"stage", "done", "total", "started_at"} <= found.keys():
        return None
    elapsed = max(0.0, time.time() - found["started_at"])
    done, total = found["done"], found["total"]
    eta = elapsed / done * (total - done) if done and total >= done else None
    return {**found, "eta_s": eta}


def clear_progress(folder: Path) -> None:
    (folder / PROGRESS_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the replay folder's writer lock; raise BuildLocked when another process holds it."""
    with exclusive_lock(folder / LOCK_FILE, lambda: BuildLocked(f"another process is building the replay buffer in {folder}")):
        yield

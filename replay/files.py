"""File names of the replay folder, the manifest's format, the build's lock and exit code.

Owns the names of everything under the replay folder (`<state>/replay/`) and how the published
manifest is recognised. Knows nothing of what the files hold; the write discipline is
`replay.durable`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from replay.durable import exclusive_lock, read_json

MANIFEST_FILE = "manifest.json"
PASSAGES_FILE = "passages.sqlite3"
EMBEDDINGS_FILE = "embeddings.f32"
INDEX_SUFFIX = ".faiss"
SYNTHETIC_DIR = "synthetic"
SYNTHETIC_CORPUS_FILE = "corpus.jsonl"
SYNTHETIC_META_FILE = "meta.json"
REHEARSAL_FILE = "rehearsal.json"
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


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the replay folder's writer lock; raise BuildLocked when another process holds it."""
    with exclusive_lock(folder / LOCK_FILE, lambda: BuildLocked(f"another process is building the replay buffer in {folder}")):
        yield

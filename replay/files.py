"""File names of the replay folder, atomic writes and the single-writer lock.

Owns the names of everything under the replay folder (`<state>/replay/`), the manifest's format,
the write-fsync-rename discipline, and the build's lock and exit code. Knows nothing of what the
files hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST_FILE = "manifest.json"
PASSAGES_FILE = "passages.sqlite3"
EMBEDDINGS_FILE = "embeddings.f32"
TRAIN_INDEX_PREFIX = "train"
HELD_OUT_INDEX_PREFIX = "held_out"
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


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file, fsync it and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda handle: handle.write(payload))


def atomic_write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
    atomic_write(path, lambda handle: handle.write(payload))


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The published buffer's manifest, or None when there is none (or it is unreadable)."""
    data = read_json(folder / MANIFEST_FILE)
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the replay folder's writer lock; raise BuildLocked when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildLocked(f"another process is building the replay buffer in {folder}") from None
        yield

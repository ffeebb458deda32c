"""The passages of the replay buffer and their embeddings, on disk.

Owns `passages.sqlite3` (one row per unique passage: text, token count, held-out flag; which
corpus files were read how far; the settings the passages were cut with) and `embeddings.f32`
(row `id - 1` holds passage `id`'s vector). Both only grow, so a build resumes where it stopped:
a crash leaves at worst a partial last row of vectors, cut off on the next open. Knows nothing
of FAISS, nor of how passages are cut or embedded.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from replay.corpus import Passage, is_held_out
from replay.files import EMBEDDINGS_FILE, PASSAGES_FILE

SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY, digest TEXT NOT NULL UNIQUE, text TEXT NOT NULL,
    tokens INTEGER NOT NULL, held_out INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    position INTEGER NOT NULL, complete INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SQL_CHUNK = 500


@dataclass(frozen=True)
class SourceRow:
    """How far a corpus file has been read: `position` passages, all of them when `complete`."""

    size: int
    mtime_ns: int
    position: int
    complete: bool


@dataclass(frozen=True)
class StoredPassage:
    id: int
    text: str
    tokens: int
    held_out: bool


class PassageStore:
    def __init__(self, folder: Path, readonly: bool = False):
        self.folder = folder
        path = folder / PASSAGES_FILE
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # settings and counters ------------------------------------------------------------------

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def check(self) -> None:
        """Raise sqlite3.DatabaseError when the file is damaged."""
        result = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise sqlite3.DatabaseError(f"{PASSAGES_FILE}: {result}")

    # corpus files ----------------------------------------------------------------------------

    def sources(self) -> dict[str, SourceRow]:
        rows = self.db.execute("SELECT path, size, mtime_ns, position, complete FROM sources")
        return {path: SourceRow(size, mtime, position, bool(done)) for path, size, mtime, position, done in rows}

    def add_passages(self, path: str, stamp: tuple[int, int], passages: Sequence[Passage], position: int,
                     complete: bool, held_out_fraction: float) -> None:
        """Add a file's next passages (duplicates of stored ones are skipped) and its new position."""
        rows = [(p.digest, p.text, p.tokens, int(is_held_out(p.digest, held_out_fraction))) for p in passages]
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO passages (digest, text, tokens, held_out) VALUES (?, ?, ?, ?)", rows)
            self.db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?)", (path, *stamp, position, complete))

    # passages ----------------------------------------------------------------------------------

    def count(self, held_out: bool | None = None) -> int:
        if held_out is None:
            return self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM passages WHERE held_out = ?", (int(held_out),)).fetchone()[0]

    def ids(self, held_out: bool) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM passages WHERE held_out = ? ORDER BY id", (int(held_out),))
        return np.fromiter((row[0] for row in rows), dtype=np.int64)

    def get(self, ids: Iterable[int]) -> list[StoredPassage]:
        """The passages with these ids, in the order asked (unknown ids are left out)."""
        wanted = [int(i) for i in ids]
        found: dict[int, StoredPassage] = {}
        for start in range(0, len(wanted), SQL_CHUNK):
            chunk = wanted[start:start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(f"SELECT id, text, tokens, held_out FROM passages WHERE id IN ({marks})", chunk):
                found[row[0]] = StoredPassage(row[0], row[1], row[2], bool(row[3]))
        return [found[i] for i in wanted if i in found]

    def pending(self, after_id: int, limit: int) -> list[tuple[int, str]]:
        """Passages not yet embedded: ids above `after_id`, in id order."""
        rows = self.db.execute("SELECT id, text FROM passages WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
        return rows.fetchall()

    # embeddings --------------------------------------------------------------------------------

    @property
    def embedded(self) -> int:
        """How many passages have their vector on disk (ids 1..embedded)."""
        return int(self.meta("embedded", 0))

    def trim_vectors(self, dim: int) -> None:
        """Cut the vectors file to the rows the database vouches for (a crash may leave more)."""
        path = self.folder / EMBEDDINGS_FILE
        rows = min(self.embedded, _rows_on_disk(path, dim))
        with open(path, "ab") as handle:
            handle.truncate(rows * dim * 4)
        if rows != self.embedded:
            self.set_meta("embedded", rows)

    def append_vectors(self, first_id: int, vectors: np.ndarray) -> None:
        """Store the vectors of passages first_id.. (they must follow the stored ones)."""
        if first_id != self.embedded + 1:
            raise ValueError(f"vectors for passage {first_id} would not follow the {self.embedded} stored ones")
        with open(self.folder / EMBEDDINGS_FILE, "ab") as handle:
            handle.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        self.set_meta("embedded", self.embedded + len(vectors))

    def vectors(self, dim: int) -> np.ndarray:
        """All stored vectors, memory-mapped: row `id - 1` is passage `id`."""
        rows = self.embedded
        if rows == 0:
            return np.zeros((0, dim), dtype=np.float32)
        return np.memmap(self.folder / EMBEDDINGS_FILE, dtype=np.float32, mode="r", shape=(rows, dim))


def _rows_on_disk(path: Path, dim: int) -> int:
    try:
        return path.stat().st_size // (dim * 4)
    except FileNotFoundError:
        return 0

"""The journal: every input file and every document, in one SQLite file (`<state>/journal.sqlite3`).

Owns the schema, the transactions and the queries. WAL mode and one writer: a `Journal` is the
only way to write, and one process at a time holds one (`daemon.ingestion.ingest` takes the ingest lock
first); `counts` and `outcome` read alongside it without blocking it. Knows nothing of files,
formats or tokenizers: it stores what it is handed.

Tables:
- `documents`: one row per unique content (`hash`: sha256 of the normalised records), with the
  name and size of the first file that brought it. State `pending` (accepted, not chunked yet)
  → `ready` (chunked) → `learned` (by adapter `version`). `attempts` counts the cycles a ready
  document was part of whose candidate the gate refused; at the limit the document is set aside
  (`set_aside`: why) and waits for `retry` instead of the next cycle.
- `contents`: each document's normalised records (JSON), kept so chunking can be (re)done.
- `chunks`: each document's training records in order, with their token counts.
- `inputs`: one row per input file, whatever became of it: a new `document`, a `duplicate` of
  one, or `quarantined` with a `reason`. `stored_as` (relative to the state directory) is where
  the file goes; `moved` turns 1 once it is there. A row committed with `moved = 0` is a move
  still to finish: that is how a crash between the commit and the rename is redone.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.ingestion.chunking import record_text
from daemon.layout import StateDir
from replay.durable import DamagedFile

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    tokens INTEGER,
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'learned')),
    version TEXT,
    added_at REAL NOT NULL,
    learned_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    set_aside TEXT);
CREATE INDEX IF NOT EXISTS documents_state ON documents (state);
CREATE TABLE IF NOT EXISTS contents (
    document_id INTEGER PRIMARY KEY REFERENCES documents (id),
    records TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    document_id INTEGER NOT NULL REFERENCES documents (id),
    seq INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    record TEXT NOT NULL,
    UNIQUE (document_id, seq));
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('document', 'duplicate', 'quarantined')),
    document_id INTEGER REFERENCES documents (id),
    reason TEXT,
    stored_as TEXT NOT NULL,
    moved INTEGER NOT NULL DEFAULT 0,
    at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS inputs_name ON inputs (name);
CREATE INDEX IF NOT EXISTS inputs_unmoved ON inputs (moved) WHERE moved = 0;
"""
BUSY_TIMEOUT_MS = 10_000
EMPTY_COUNTS = {"ingested": 0, "pending": 0, "quarantined": 0, "learned": 0, "duplicates": 0, "ready": 0,
                "set_aside": 0}
SET_ASIDE = "set_aside"  # a pseudo-state: ready documents the gate refused too often (schedule.max_attempts)
DOCUMENT_KEYS = ("id", "hash", "source", "bytes", "tokens", "version", "attempts", "set_aside")

REBUILD_HINT = "stop cld and run `cld journal rebuild` (it rebuilds the journal from processed/ and quarantine/)"

Record = dict[str, Any]


class DamagedJournal(DamagedFile):
    """The journal cannot be trusted; the message names the file and the command that rebuilds it."""
Chunks = list[tuple[int, Record]]  # (tokens, training record), in order


@dataclass(frozen=True)
class Input:
    """An input file as found: its name relative to the inbox, size and modification time."""

    name: str
    bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class Recorded:
    """What the journal holds about one input file."""

    id: int
    name: str
    bytes: int
    mtime_ns: int
    outcome: str
    document_id: int | None
    reason: str | None
    stored_as: str
    moved: bool


INPUT_COLUMNS = "id, name, bytes, mtime_ns, outcome, document_id, reason, stored_as, moved"


class Journal:
    """The writer. Safe to share between threads of one process (writes take a lock)."""

    def __init__(self, path: Path):
        """Open (or create) the journal. DamagedJournal when the file is damaged, or empty while
        the state directory holds files it must have recorded."""
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_not_emptied(path)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                  timeout=BUSY_TIMEOUT_MS / 1000)
        self.lock = threading.Lock()
        try:
            _check_intact(self.db, path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            _migrate(self.db)
            self.db.executescript(f"{SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};")  # idempotent
        except sqlite3.DatabaseError as error:
            self.db.close()
            if _disk_full(error, path):
                raise _full(path) from None
            if _primary(error) not in (None, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise OSError(errno.EIO, f"{path} cannot be opened ({error}); it is not known to be damaged: "
                                         "check the disk and its permissions") from None
            raise DamagedJournal(f"{path} is damaged ({error}): {REBUILD_HINT}") from None
        except DamagedJournal:
            self.db.close()
            raise

    def close(self) -> None:
        with self.lock:  # not under a transaction another thread is in
            self.db.close()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.lock, self._no_room_is_enospc():
            return self.db.execute(sql, params).fetchall()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        with self.lock, self._no_room_is_enospc():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            try:
                self.db.execute("COMMIT")
            except sqlite3.OperationalError:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    @contextmanager
    def _no_room_is_enospc(self) -> Iterator[None]:
        """SQLite's "database or disk is full" as the OSError (ENOSPC) every caller already handles:
        nothing was written, and it works again once there is room."""
        try:
            yield
        except sqlite3.OperationalError as error:
            if _disk_full(error, self.path):
                raise _full(self.path) from None
            raise

    # input files ------------------------------------------------------------------------------

    def knows(self, digest: str) -> bool:
        """Whether a document with this content hash is recorded."""
        return bool(self._query("SELECT 1 FROM documents WHERE hash = ?", (digest,)))

    def accept(self, item: Input, stored_as: str, digest: str, records: list[Record], chunks: Chunks | None = None,
               moved: Iterable[int] = ()) -> Recorded:
        """Record a readable input: a new document (ready when its `chunks` are given, else
        pending), or a duplicate of the one with `digest`. The inputs in `moved` are marked
        moved in the same commit."""
        with self._write() as db:
            _mark_moved(db, moved)
            row = db.execute("SELECT id FROM documents WHERE hash = ?", (digest,)).fetchone()
            if row is not None:
                return _insert_input(db, item, "duplicate", stored_as, document_id=row[0])
            document_id = _insert_document(db, item, digest, records)
            if chunks is not None:
                _store_chunks(db, document_id, chunks)
            return _insert_input(db, item, "document", stored_as, document_id=document_id)

    def quarantine(self, item: Input, stored_as: str, reason: str, moved: Iterable[int] = ()) -> Recorded:
        with self._write() as db:
            _mark_moved(db, moved)
            return _insert_input(db, item, "quarantined", stored_as, reason=reason)

    def mark_moved(self, input_ids: Iterable[int]) -> None:
        with self._write() as db:
            _mark_moved(db, input_ids)

    def unmoved(self) -> list[Recorded]:
        """Inputs committed whose file has not reached `stored_as` yet (a crash came between)."""
        rows = self._query(f"SELECT {INPUT_COLUMNS} FROM inputs WHERE moved = 0 ORDER BY id")
        return [_recorded(row) for row in rows]

    def inputs(self) -> list[Recorded]:
        return [_recorded(row) for row in self._query(f"SELECT {INPUT_COLUMNS} FROM inputs ORDER BY id")]

    # documents and chunks ---------------------------------------------------------------------

    def pending(self) -> list[int]:
        """Ids of documents accepted but not chunked yet, oldest first."""
        return [row[0] for row in self._query("SELECT id FROM documents WHERE state = 'pending' ORDER BY id")]

    def records(self, document_id: int) -> list[Record]:
        rows = self._query("SELECT records FROM contents WHERE document_id = ?", (document_id,))
        if not rows:
            raise KeyError(f"no document {document_id}")
        return json.loads(rows[0][0])

    def set_chunks(self, document_id: int, chunks: Iterable[tuple[int, Record]]) -> int:
        """Store a pending document's chunks ((tokens, record) in order) and make it ready.

        Replaces any chunks stored before, so redoing it is harmless. Returns the token count.
        """
        listed = list(chunks)
        with self._write() as db:
            return _store_chunks(db, document_id, listed)

    def chunks(self, document_ids: Iterable[int]) -> list[Record]:
        """The training records of these documents, document by document, in order."""
        found: list[Record] = []
        for document_id in document_ids:
            rows = self._query("SELECT record FROM chunks WHERE document_id = ? ORDER BY seq", (document_id,))
            found.extend(json.loads(row[0]) for row in rows)
        return found

    def documents(self, state: str) -> list[dict[str, Any]]:
        """Documents in `state` (pending, ready, learned, or set_aside: ready, but refused too often):
        id, hash, source, bytes, tokens, version, attempts, set_aside (why, or None)."""
        where = "state = 'ready' AND set_aside IS NOT NULL" if state == SET_ASIDE else "state = ? AND set_aside IS NULL"
        rows = self._query(f"SELECT {', '.join(DOCUMENT_KEYS)} FROM documents WHERE {where} ORDER BY id",
                           () if state == SET_ASIDE else (state,))
        return [dict(zip(DOCUMENT_KEYS, row)) for row in rows]

    def every_document(self) -> list[dict[str, Any]]:
        """Every document, whatever its state: id, hash, source, state (pending, ready or learned)."""
        rows = self._query("SELECT id, hash, source, state FROM documents ORDER BY id")
        return [dict(zip(("id", "hash", "source", "state"), row)) for row in rows]

    def text(self, document_id: int) -> str:
        """A document's words, its records one after another (KeyError when there is no such document)."""
        return "\n\n".join(record_text(record) for record in self.records(document_id))

    def refused(self, document_ids: Iterable[int], why: str, max_attempts: int) -> list[dict[str, Any]]:
        """Count a refused cycle against these ready documents; those refused `max_attempts` times
        (0 = never) are set aside with `why`. Returns the documents set aside now."""
        ids = list(document_ids)
        with self._write() as db:
            db.executemany("UPDATE documents SET attempts = attempts + 1 WHERE id = ? AND state = 'ready'",
                           [(i,) for i in ids])
            if max_attempts:
                db.executemany("UPDATE documents SET set_aside = ? WHERE id = ? AND state = 'ready' "
                               "AND set_aside IS NULL AND attempts >= ?", [(why, i, max_attempts) for i in ids])
        return [doc for doc in self.documents(SET_ASIDE) if doc["id"] in ids and doc["attempts"] >= max_attempts > 0]

    def refused_by_hash(self, hashes: Iterable[str], why: str, max_attempts: int) -> list[dict[str, Any]]:
        """`refused` for the ready documents with these content hashes (a rebuilt journal learns of
        refused cycles from their records and the candidates' meta.json)."""
        wanted = set(hashes)
        ids = [doc["id"] for doc in self.documents("ready") if doc["hash"] in wanted]
        return self.refused(ids, why, max_attempts)

    def set_aside(self, document_id: int, why: str) -> None:
        """Keep a ready document out of every cycle, saying why, until `retry` puts it back."""
        with self._write() as db:
            db.execute("UPDATE documents SET set_aside = ? WHERE id = ? AND state = 'ready'", (why, document_id))

    def retry(self, document_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Put set-aside documents (these, or all) back into the next cycle, their count restarted."""
        chosen = [doc for doc in self.documents(SET_ASIDE) if document_ids is None or doc["id"] in set(document_ids)]
        with self._write() as db:
            db.executemany("UPDATE documents SET set_aside = NULL, attempts = 0 WHERE id = ?",
                           [(doc["id"],) for doc in chosen])
        return chosen

    def mark_learned_by_hash(self, hashes: Iterable[str], version: str) -> int:
        """Record that adapter `version` learned the documents with these content hashes (a
        rebuilt journal learns this from the adapters' meta.json). Returns how many."""
        now = time.time()
        with self._write() as db:
            changed = db.executemany("UPDATE documents SET state = 'learned', version = ?, learned_at = ? "
                                     "WHERE hash = ? AND state != 'learned'", [(version, now, h) for h in hashes])
            return changed.rowcount

    def mark_learned(self, document_ids: Iterable[int], version: str) -> None:
        """Record that adapter `version` learned these (ready) documents."""
        now = time.time()
        with self._write() as db:
            db.executemany("UPDATE documents SET state = 'learned', version = ?, learned_at = ? "
                           "WHERE id = ? AND state = 'ready'", [(version, now, i) for i in document_ids])


NO_ROOM_BYTES = 1 << 20  # an I/O error with less free than this is the disk being full (SQLite's -shm file)


def _primary(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _disk_full(error: sqlite3.Error, path: Path) -> bool:
    """SQLite's "database or disk is full", or an I/O error on a disk with (nearly) no room left."""
    if _primary(error) == sqlite3.SQLITE_FULL or "disk is full" in str(error):
        return True
    if _primary(error) != sqlite3.SQLITE_IOERR:
        return False
    try:
        found = os.statvfs(path.parent)
    except OSError:
        return False
    return found.f_bavail * found.f_frsize < NO_ROOM_BYTES


def _full(path: Path) -> OSError:
    return OSError(errno.ENOSPC, f"the disk holding {path.parent} is full: nothing was recorded; free some space "
                                 "and try again (the journal is intact)")


def _check_not_emptied(path: Path) -> None:
    """An empty journal file beside processed or quarantined files lost what it recorded (SQLite
    would take it for a new, empty journal and count nothing)."""
    if not path.is_file() or path.stat().st_size > 0:
        return
    state = StateDir(path.parent)
    if any(folder.is_dir() and any(folder.iterdir()) for folder in (state.processed, state.quarantine)):
        raise DamagedJournal(f"{path} is empty, but {state.processed} or {state.quarantine} hold files it "
                             f"recorded: {REBUILD_HINT}")


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a journal of an older schema up to this one (version 1 had no attempts or set_aside)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(documents)").fetchall()}
    if columns and "attempts" not in columns:
        db.executescript("BEGIN; ALTER TABLE documents ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0; "
                         "ALTER TABLE documents ADD COLUMN set_aside TEXT; COMMIT;")


def _check_intact(db: sqlite3.Connection, path: Path) -> None:
    found = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    if found != ["ok"]:
        raise DamagedJournal(f"{path} is damaged ({'; '.join(found[:3])}): {REBUILD_HINT}")


def _insert_document(db: sqlite3.Connection, item: Input, digest: str, records: list[Record]) -> int:
    cursor = db.execute(
        "INSERT INTO documents (hash, source, bytes, state, added_at) VALUES (?, ?, ?, 'pending', ?)",
        (digest, item.name, item.bytes, time.time()))
    document_id = int(cursor.lastrowid or 0)
    db.execute("INSERT INTO contents VALUES (?, ?)", (document_id, json.dumps(records, ensure_ascii=False)))
    return document_id


def _store_chunks(db: sqlite3.Connection, document_id: int, chunks: Chunks) -> int:
    rows = [(document_id, seq, tokens, json.dumps(record, ensure_ascii=False)) for seq, (tokens, record) in
            enumerate(chunks)]
    total = sum(row[2] for row in rows)
    db.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))
    db.executemany("INSERT INTO chunks (document_id, seq, tokens, record) VALUES (?, ?, ?, ?)", rows)
    db.execute("UPDATE documents SET tokens = ?, state = 'ready' WHERE id = ? AND state = 'pending'",
               (total, document_id))
    return total


def _mark_moved(db: sqlite3.Connection, input_ids: Iterable[int]) -> None:
    db.executemany("UPDATE inputs SET moved = 1 WHERE id = ?", [(i,) for i in input_ids])


def _insert_input(db: sqlite3.Connection, item: Input, outcome: str, stored_as: str,
                  document_id: int | None = None, reason: str | None = None) -> Recorded:
    cursor = db.execute(
        "INSERT INTO inputs (name, bytes, mtime_ns, outcome, document_id, reason, stored_as, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (item.name, item.bytes, item.mtime_ns, outcome, document_id, reason, stored_as, time.time()))
    return Recorded(int(cursor.lastrowid or 0), item.name, item.bytes, item.mtime_ns, outcome, document_id,
                    reason, stored_as, moved=False)


def _recorded(row: tuple[Any, ...]) -> Recorded:
    return Recorded(*row[:-1], moved=bool(row[-1]))


# readers (any process, no lock) -------------------------------------------------------------------

@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection, or None when there is no journal yet (or its tables are not made yet)."""
    if not path.is_file():
        yield None
        return
    _check_not_emptied(path)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        try:
            made = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'inputs'").fetchone()
        except sqlite3.DatabaseError as error:
            raise DamagedJournal(f"{path} is damaged ({error}): {REBUILD_HINT}") from None
        yield db if made else None
    finally:
        db.close()


def counts(path: Path) -> dict[str, int]:
    """The status counts: unique documents `ingested`, of them `pending` (not learned yet; `ready`
    of those are chunked and wait for the next cycle) and `learned`; `set_aside` (refused too often,
    not counted as pending: they wait for `cld retry`); input files `quarantined`,
    and `duplicates` (files whose content was already known)."""
    with _reading(path) as db:
        if db is None:
            return dict(EMPTY_COUNTS)
        states = dict(db.execute("SELECT state, COUNT(*) FROM documents GROUP BY state").fetchall())
        outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM inputs GROUP BY outcome").fetchall())
        try:
            aside = db.execute("SELECT COUNT(*) FROM documents WHERE state = 'ready' AND set_aside IS NOT NULL").fetchone()[0]
        except sqlite3.OperationalError:  # a journal of schema 1, not opened by a daemon since
            aside = 0
    return {
        "ingested": sum(states.values()),
        "pending": states.get("pending", 0) + states.get("ready", 0) - aside,
        "quarantined": outcomes.get("quarantined", 0),
        "learned": states.get("learned", 0),
        "duplicates": outcomes.get("duplicate", 0),
        "ready": states.get("ready", 0) - aside,
        "set_aside": aside,
    }


def set_aside(path: Path) -> list[dict[str, Any]]:
    """The documents set aside (refused too often), read alongside the writer: id, source, attempts, why."""
    with _reading(path) as db:
        if db is None:
            return []
        try:
            rows = db.execute("SELECT id, source, attempts, set_aside FROM documents "
                              "WHERE state = 'ready' AND set_aside IS NOT NULL ORDER BY id").fetchall()
        except sqlite3.OperationalError:  # schema 1: nothing was ever set aside
            return []
    return [dict(zip(("id", "source", "attempts", "why"), row)) for row in rows]


def outcome(path: Path, name: str, after: int = 0) -> Recorded | None:
    """The latest record of the input file `name` (relative to the inbox) with an id above `after`."""
    with _reading(path) as db:
        if db is None:
            return None
        row = db.execute(f"SELECT {INPUT_COLUMNS} FROM inputs WHERE name = ? AND id > ? ORDER BY id DESC LIMIT 1",
                         (name, after)).fetchone()
    return _recorded(row) if row else None


def last_input_id(path: Path) -> int:
    """The id of the latest input recorded (0 for none): later records have higher ones."""
    with _reading(path) as db:
        return db.execute("SELECT COALESCE(MAX(id), 0) FROM inputs").fetchone()[0] if db else 0

"""Ingestion of one inbox file: read, normalise, dedup, journal, move; or quarantine with a reason.

Owns the per-file protocol that makes a crash at any moment harmless:
  1. check and read the file; nothing is written yet, so a crash here means it is read again;
  2. commit its journal rows (the input, plus a new document or the one it duplicates, or the
     quarantine reason) together with where the file goes;
  3. write the `.reason` file (quarantine only) and move the file to processed/ or quarantine/;
  4. mark the input moved (with the next commit, or at `flush`).
`recover` (run before anything new is read) redoes steps 3-4 for every committed input whose file
has not moved, so nothing is lost and nothing is journaled twice. A reader that fails in any way
quarantines the file instead of stopping ingestion.

Chunking needs the base model's tokenizer, which exists only once the model is prepared (the
daemon prepares it at start, in another process; `cld prepare` does too). So a document is
committed `pending` first and chunked as soon as a tokenizer is there (`chunk_pending`): files are
accepted, journaled and moved even before that.

Also owns the ingest lock: one process at a time writes the journal. Knows nothing of watching
folders (`daemon.ingestion.watch`), file formats (`daemon.ingestion.readers`), how files reach the
inbox (`daemon.ingestion.inbox`) or HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from daemon import model
from daemon.config import Settings
from daemon.ingestion.chunking import MESSAGE_TOKENS, Chunker, content_hash, load_tokenizer, normalise_records
from daemon.ingestion.inbox import free_path, reason_path
from daemon.ingestion.journal import Chunks, Input, Journal, Recorded
from daemon.ingestion.readers import CHARS_PER_TOKEN, ReadLimits, Record, Unreadable, get_reader, too_many_tokens
from daemon.layout import StateDir
from replay.durable import atomic_write_text, exclusive_lock, move_durably

log = logging.getLogger(__name__)

ChunkerSource = Callable[[], "Chunker | None"]
TOKENIZER_RETRY_S = 10.0


class IngestBusy(RuntimeError):
    """Another process (the daemon, or another `cld ingest`) holds the ingest lock."""


class Ingester:
    """Takes inbox files into the journal one at a time. Build it with `open_ingester`."""

    def __init__(self, settings: Settings, journal: Journal, chunker: ChunkerSource):
        assert settings.watch.inbox is not None, "load_settings resolves watch.inbox"
        self.inbox = settings.watch.inbox
        self.state = StateDir(settings.state.dir)
        self.max_bytes = settings.ingest.max_file_bytes
        ingest = settings.ingest
        self.limits = ReadLimits(ingest.max_document_tokens, ingest.max_pdf_pages, ingest.extract_timeout_s)
        self.journal = journal
        self.chunker = chunker
        self.moved: list[int] = []  # inputs moved, to be marked with the next commit (`flush`)

    def ingest(self, path: Path) -> Recorded | None:
        """Take the inbox file `path`; None when it vanished before it was read."""
        name = self._name(path)
        item = _found(path, name) if name is not None else None
        if item is None:
            return None
        unfinished = self._unfinished(item)
        if unfinished is not None:  # journaled, but its move failed (e.g. a full disk): finish, never journal twice
            self._finish(unfinished, recovering=True)
            return unfinished
        try:
            records = self._read(path, item)
            digest = content_hash(records)
            chunks = self._chunks(records, digest)
        except FileNotFoundError:
            return None
        except Unreadable as error:
            return self._quarantine(item, error.reason)
        except Exception as error:  # a reader's bug must not stop ingestion: the file waits in quarantine
            log.exception("reading %s failed", name)
            return self._quarantine(item, f"could not be read: {type(error).__name__}: {error}"[:500])
        return self._accept(item, records, digest, chunks)

    def recover(self) -> int:
        """Finish the moves a crash interrupted (inputs committed, files not moved yet)."""
        unmoved = self.journal.unmoved()
        for recorded in unmoved:
            log.info("finishing the interrupted intake of %s", recorded.name)
            try:
                self._finish(recorded, recovering=True)
            except OSError as error:  # e.g. the disk is still full: the next offer of the file finishes it
                log.error("could not finish the intake of %s yet: %s", recorded.name, error)
        self.flush()
        return len(unmoved)

    def flush(self) -> None:
        """Mark the inputs moved since the last commit (they are marked with each commit anyway;
        a crash before that only means `recover` finds them moved already)."""
        if self.moved:
            self.journal.mark_moved(self.moved)
            self.moved = []

    def chunk_pending(self) -> int:
        """Chunk every document still pending, when the tokenizer is there. Returns how many."""
        pending = self.journal.pending()
        chunker = self.chunker() if pending else None
        if chunker is None:
            return 0
        for document_id in pending:
            chunks, tokens = chunker.cut(self.journal.records(document_id))
            self.journal.set_chunks(document_id, chunks)
            if tokens > self.limits.max_tokens:  # taken before a tokenizer could count it: never trained
                reason = too_many_tokens(tokens, self.limits.max_tokens)
                self.journal.set_aside(document_id, reason)
                log.warning("document %d set aside: %s", document_id, reason)
        return len(pending)

    def adopt(self, stored: Path, folder: Path) -> Recorded:
        """Journal a file that is already in processed/ or quarantine/ (`folder`), as its intake
        recorded it; nothing moves. How `cld journal rebuild` makes a journal anew."""
        info = os.lstat(stored)
        item = Input(stored.relative_to(folder).as_posix(), info.st_size, info.st_mtime_ns)
        stored_as = self._relative(stored)
        if folder == self.state.quarantine:
            recorded = self.journal.quarantine(item, stored_as, _recorded_reason(stored))
        else:
            try:
                records = self._read(stored, item)
                digest = content_hash(records)
                chunks = self._chunks(records, digest)
            except Unreadable as error:  # it was taken once; now it is not: keep it where it is, say why
                recorded = self.journal.quarantine(item, stored_as, f"{error.reason} (found in processed/)")
            else:
                recorded = self.journal.accept(item, stored_as, digest, records, chunks)
        self.journal.mark_moved([recorded.id])
        return recorded

    def _unfinished(self, item: Input) -> Recorded | None:
        return next((recorded for recorded in self.journal.unmoved()
                     if recorded.name == item.name and _same_file(item, recorded)), None)

    def _name(self, path: Path) -> str | None:
        """The name relative to the inbox, or None (logged) when the folder holding it is elsewhere."""
        inbox = Path(os.path.realpath(self.inbox))
        folder = Path(os.path.realpath(path.parent))
        if not folder.is_relative_to(inbox) or path.name in ("", ".", ".."):
            log.warning("not taking %s: its folder is outside the inbox %s", path, self.inbox)
            return None
        return (folder / path.name).relative_to(inbox).as_posix()

    def _read(self, path: Path, item: Input) -> list[Record]:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise Unreadable(_link_reason(path, self.inbox))
        if not stat.S_ISREG(mode):
            raise Unreadable("not a regular file (a pipe, socket or device): only files are taken")
        if item.bytes > self.max_bytes:
            raise Unreadable(f"too large: {item.bytes / 1e6:.3g} MB is over ingest.max_file_mb = "
                             f"{self.max_bytes / 1e6:g}")
        reader = get_reader(path.suffix)
        if item.bytes == 0:
            raise Unreadable("empty: the file has no bytes")
        records = normalise_records(reader(_read_bytes(path, self.max_bytes), self.limits))  # the bytes go once read
        self.limits.check_text(sum(_chars(record) for record in records))
        if not records:
            raise Unreadable("empty: the file holds no text")
        return records

    def _chunks(self, records: list[Record], digest: str) -> Chunks | None:
        """A new document's chunks, when the tokenizer is there (None for a duplicate, or before
        it: `chunk_pending` then counts); Unreadable when what would be trained is over the bound."""
        chunker = None if self.journal.knows(digest) else self.chunker()
        if chunker is None:
            return None
        chunks, tokens = chunker.cut(records)
        self.limits.check_tokens(tokens)
        return chunks

    def _accept(self, item: Input, records: list[Record], digest: str, chunks: Chunks | None) -> Recorded:
        target = free_path(self.state.processed, item.name)
        recorded = self.journal.accept(item, self._relative(target), digest, records, chunks, self.moved)
        self.moved = []
        self._finish(recorded)
        log.info("ingested %s: %s", item.name, recorded.outcome)
        return recorded

    def _quarantine(self, item: Input, reason: str) -> Recorded:
        target = free_path(self.state.quarantine, item.name)
        recorded = self.journal.quarantine(item, self._relative(target), reason, self.moved)
        self.moved = []
        self._finish(recorded)
        log.warning("quarantined %s: %s", item.name, reason)
        return recorded

    def _finish(self, recorded: Recorded, recovering: bool = False) -> None:
        """Steps 3-4: the reason file, the move, the mark (with the next commit). Repeating
        them is harmless. On recovery a file only moves if it is still the one recorded."""
        source, target = self.inbox / recorded.name, self.state.root / recorded.stored_as
        if recorded.reason is not None:
            atomic_write_text(reason_path(target), _reason_text(recorded))
        found = _found(source, recorded.name)
        if found is not None and (not recovering or _same_file(found, recorded)):
            move_durably(source, target)
        elif not os.path.lexists(target):
            log.warning("%s left the inbox before it was moved to %s", recorded.name, recorded.stored_as)
        self.moved.append(recorded.id)

    def _relative(self, target: Path) -> str:
        return target.relative_to(self.state.root).as_posix()


def _found(path: Path, name: str) -> Input | None:
    """The input as it is now; None when it is gone (or cannot even be looked at) or a folder."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return None if stat.S_ISDIR(info.st_mode) else Input(name, info.st_size, info.st_mtime_ns)


def _same_file(found: Input, recorded: Recorded) -> bool:
    return (found.bytes, found.mtime_ns) == (recorded.bytes, recorded.mtime_ns)


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, never through a symlink, never blocking on a pipe swapped in."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unreadable("not a regular file: only files are taken")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Unreadable(f"too large: over ingest.max_file_mb = {max_bytes / 1e6:g}")
    return data


def _link_reason(path: Path, inbox: Path) -> str:
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(os.path.realpath(inbox)):
        return f"escapes the inbox: a symlink to {target}, outside it; put the file itself in the inbox"
    return "a symlink: links are not followed; put the file itself in the inbox"


def _chars(record: Record) -> int:
    """Characters of text in a normalised record (text, prompt and completion, or messages with
    their roles and the template's markers around each: what training will see), before a
    tokenizer counts its tokens."""
    if "messages" in record:
        return sum(len(message["role"]) + len(message["content"]) + MESSAGE_TOKENS * CHARS_PER_TOKEN
                   for message in record["messages"])
    return sum(len(value) for value in record.values() if isinstance(value, str))


def _recorded_reason(stored: Path) -> str:
    """The reason a quarantined file's `.reason` note gives (its first paragraph)."""
    try:
        return reason_path(stored).read_text(encoding="utf-8").split("\n\n", 1)[0].strip() or "quarantined"
    except (OSError, UnicodeDecodeError):
        return "quarantined (the reason note is missing)"


def _reason_text(recorded: Recorded) -> str:
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (f"{recorded.reason}\n\nfile: {recorded.name} ({recorded.bytes} bytes), quarantined {when}\n"
            "To retry, fix the file and drop it into the inbox again.\n")


# the base model's chunker ----------------------------------------------------------------------

class BaseModelChunker:
    """The chunker of the base model's tokenizer, once the model is prepared (looked for again
    at most every TOKENIZER_RETRY_S until then); None before."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.found: Chunker | None = None
        self.next_try = 0.0

    def __call__(self) -> Chunker | None:
        if self.found is None and time.monotonic() >= self.next_try:
            self.next_try = time.monotonic() + TOKENIZER_RETRY_S
            self.found = self._load()
        return self.found

    def _load(self) -> Chunker | None:
        try:
            folder = model.prepared(self.settings.model.base, StateDir(self.settings.state.dir))
            if folder is None:
                log.info("the base model is not prepared yet: documents are chunked once it is")
                return None
            tokenizer = load_tokenizer(folder)
        except (model.ModelError, OSError, ValueError) as error:
            log.error("documents cannot be chunked yet: %s", error)
            return None
        ingest = self.settings.ingest
        return Chunker(tokenizer, ingest.chunk_tokens, ingest.chunk_overlap_tokens)


# one writer ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def open_ingester(settings: Settings, stop: threading.Event | None = None, chunker: ChunkerSource | None = None,
                  journal: Journal | None = None) -> Iterator[Ingester]:
    """Take the ingest lock, open the journal (or use the process's `journal`), finish
    interrupted work; yield the Ingester.

    Without `stop`, raises IngestBusy at once when another process holds the lock; with it,
    waits until the lock is free or `stop` is set (then raises IngestBusy).
    """
    state = StateDir(settings.state.dir)
    state.root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(state.ingest_lock, lambda: IngestBusy(f"another process is ingesting into {state.root}"), stop), _journal(state, journal) as opened:
        ingester = Ingester(settings, opened, chunker or BaseModelChunker(settings))
        ingester.recover()
        try:
            yield ingester
        finally:
            ingester.flush()


@contextlib.contextmanager
def _journal(state: StateDir, shared: Journal | None) -> Iterator[Journal]:
    if shared is not None:
        yield shared
        return
    journal = Journal(state.journal)
    try:
        yield journal
    finally:
        journal.close()

"""`cld journal rebuild`: a new journal from what the state directory holds, when the journal is
damaged or lost.

The damaged journal is moved aside (never deleted); every file in processed/ is read again and
journaled as a document or a duplicate, every file in quarantine/ with the reason its note gives;
documents are chunked when the base model is prepared; and the documents that promoted adapter
versions learned (the content hashes in their meta.json, handed in by the caller) are marked
learned again; then each refused cycle is counted against its documents that are still waiting, so
those refused `schedule.max_attempts` times stay set aside. Owns the rebuild. Knows nothing of
adapters or cycles: the caller says which versions learned what and which cycles refused what. The daemon must not run (the caller holds its lock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Settings
from daemon.ingestion.inbox import reason_path
from daemon.ingestion.ingest import open_ingester
from daemon.ingestion.watch import walk
from daemon.layout import REASON_SUFFIX, StateDir

log = logging.getLogger(__name__)
SQLITE_COMPANIONS = ("", "-wal", "-shm")


@dataclass(frozen=True)
class Rebuilt:
    set_aside: Path | None  # where the old journal went (None: there was none)
    documents: int
    duplicates: int
    quarantined: int
    learned: int
    set_aside_documents: int = 0


def rebuild(settings: Settings, learned: Iterable[tuple[str, list[str]]],
            refused: Iterable[tuple[str, list[str]]] = ()) -> Rebuilt:
    """Rebuild the journal; `learned` lists (version, content hashes of the documents it learned),
    `refused` (why, content hashes of the documents a refused cycle tried), oldest first."""
    state = StateDir(settings.state.dir)
    aside = _set_aside(state.journal)
    outcomes: dict[str, int] = {"document": 0, "duplicate": 0, "quarantined": 0}
    with open_ingester(settings) as ingester:
        for folder in (state.processed, state.quarantine):
            for path in inputs(folder):
                outcomes[ingester.adopt(path, folder).outcome] += 1
        ingester.chunk_pending()
        learned_count = sum(ingester.journal.mark_learned_by_hash(hashes, version) for version, hashes in learned)
        limit = settings.schedule.max_attempts
        aside_count = sum(len(ingester.journal.refused_by_hash(hashes, why, limit)) for why, hashes in refused)
    log.info("journal rebuilt: %d documents, %d duplicates, %d quarantined, %d learned, %d set aside",
             outcomes["document"], outcomes["duplicate"], outcomes["quarantined"], learned_count, aside_count)
    return Rebuilt(aside, outcomes["document"], outcomes["duplicate"], outcomes["quarantined"], learned_count,
                   aside_count)


def inputs(folder: Path) -> list[Path]:
    """The input files in processed/ or quarantine/, in the order they were taken in (the move
    there set their ctime), so of two identical files the first stays the document. `<name>.reason`
    beside `<name>` is its note; a file whose own name ends in .reason is an input when it has a
    note of its own."""
    if not folder.is_dir():
        return []
    found = [path for path in walk(folder)
             if path.is_file() and (not path.name.endswith(REASON_SUFFIX) or reason_path(path).is_file())]
    return sorted(found, key=lambda path: (path.stat().st_ctime_ns, str(path)))


def _set_aside(journal: Path) -> Path | None:
    """Move the journal and its WAL files to `<name>.damaged-<time>`; the new one starts empty."""
    if not journal.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = journal.with_name(f"{journal.name}.damaged-{stamp}")
    for suffix in SQLITE_COMPANIONS:
        found = journal.with_name(journal.name + suffix)
        if found.exists():
            found.rename(target.with_name(target.name + suffix))
    return target

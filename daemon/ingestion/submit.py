"""`cld ingest PATH...`: hand files in to the inbox, then see them ingested.

When no daemon runs, the files are ingested here at once (this process takes the ingest lock);
when the daemon runs, it takes them and this waits for the journal to say what became of each.
Owns the outcome report per file. Knows nothing of formats or of how a file is ingested.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Settings
from daemon.ingestion import journal
from daemon.ingestion.inbox import HandInError, hand_in
from daemon.ingestion.ingest import IngestBusy, open_ingester
from daemon.ingestion.journal import Recorded
from daemon.ingestion.readers import Unreadable
from daemon.ingestion.watch import ingest_inbox, walk
from daemon.layout import StateDir

WAIT_POLL_S = 0.2


@dataclass(frozen=True)
class Outcome:
    """What became of one file given to `cld ingest`: refused, recorded, or still queued."""

    source: Path
    name: str | None = None  # in the inbox
    recorded: Recorded | None = None
    refused: str | None = None


def ingest_paths(settings: Settings, paths: Iterable[Path], wait_s: float) -> list[Outcome]:
    """Hand files (folders: the files in them) in to the inbox, then ingest them here when no
    daemon is ingesting, or wait up to `wait_s` for the running daemon to take them."""
    assert settings.watch.inbox is not None
    state = StateDir(settings.state.dir)
    files = list(_expand(paths))
    after = journal.last_input_id(state.journal)
    handed = [_hand_in(settings.watch.inbox, path) if refused is None else Outcome(path, refused=refused)
              for path, refused in files]
    names = [outcome.name for outcome in handed if outcome.name is not None]
    try:
        with open_ingester(settings) as ingester:
            ingest_inbox(ingester, settings, complete=[settings.watch.inbox / name for name in names])
    except IngestBusy:
        _wait_taken(state.journal, names, after, wait_s)
    return [_settled(state.journal, outcome, after) for outcome in handed]


def _expand(paths: Iterable[Path]) -> Iterator[tuple[Path, str | None]]:
    """Each file to hand in, with why it is refused (None: it is not). A file named on the command
    line is taken as named; inside a named folder links are not followed: a link could take a file
    from anywhere (a key, another user's secret) into what the model learns."""
    for path in paths:
        if path.is_dir():
            for item in walk(path):
                if item.is_symlink():
                    yield item, (f"a symlink to {os.path.realpath(item)}: links inside a folder are not followed; "
                                 "name the file itself")
                elif item.is_file():
                    yield item, None
        elif path.is_file():
            yield path, None
        else:
            raise HandInError(f"{path}: no such file or folder")


def _hand_in(inbox: Path, path: Path) -> Outcome:
    try:
        with open(path, "rb") as source:
            return Outcome(path, name=hand_in(inbox, path.name, source).name)
    except (HandInError, Unreadable) as error:
        return Outcome(path, refused=str(error))
    except OSError as error:
        return Outcome(path, refused=f"cannot be read: {error.strerror}")


def _wait_taken(path: Path, names: list[str], after: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    waiting = set(names)
    while waiting and time.monotonic() < deadline:
        waiting = {name for name in waiting if not _taken(journal.outcome(path, name, after))}
        time.sleep(WAIT_POLL_S if waiting else 0)


def _taken(recorded: Recorded | None) -> bool:
    return recorded is not None and recorded.moved


def _settled(path: Path, outcome: Outcome, after: int) -> Outcome:
    if outcome.name is None:
        return outcome
    return Outcome(outcome.source, outcome.name, journal.outcome(path, outcome.name, after))

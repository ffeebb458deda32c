"""The inbox watcher: finds complete files in the inbox and hands them to the ingester.

    python -m daemon.ingestion.watch [--config CONFIG]   # ingest what is in the inbox now, then exit

Owns which inbox entries are candidates (subfolders are walked; dotfiles, dot-folders and
temporary names such as `.part`, `.tmp` are left alone), when a candidate is complete (its size
and modification time unchanged for `watch.stable_s`), the start-up scan for files that arrived
while the daemon was down, and the watchdog observer that wakes the loop between full scans
(every `watch.rescan_s`, in case an event was missed). The daemon runs it in a thread with a stop
event; every wait has a timeout. Knows nothing of
formats or the journal's tables (`daemon.ingestion.ingest` does the work, `daemon.ingestion.journal` keeps it).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon import logs
from daemon.config import ConfigError, Settings, load_settings
from daemon.ingestion.ingest import ChunkerSource, IngestBusy, Ingester, open_ingester
from daemon.ingestion.journal import Journal, Recorded

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", "~")
POLL_S = 0.5
STOP_TIMEOUT_S = 10.0

Stamp = tuple[int, int]  # (size, mtime_ns)


def is_ignored(name: str) -> bool:
    """Dotfiles and names of files still being written by some program."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def walk(inbox: Path) -> Iterator[Path]:
    """Every candidate under `inbox`: files, links (to anything) and other entries that are not
    folders, in subfolders too; dot-folders and links to folders are not entered."""
    for folder, subfolders, files in os.walk(inbox, followlinks=False):
        here = Path(folder)
        links = [name for name in subfolders if (here / name).is_symlink()]
        subfolders[:] = sorted(n for n in subfolders if not is_ignored(n) and n not in links)
        for name in sorted(files + links):
            if not is_ignored(name):
                yield here / name


def _visible(path: Path, inbox: Path) -> bool:
    """Whether an event's path is one `walk` would offer: inside the inbox, no part ignored."""
    return path.is_relative_to(inbox) and not any(is_ignored(part) for part in path.relative_to(inbox).parts)


def _stamp(path: Path) -> Stamp | None:
    """(size, mtime) of a candidate; None for what is gone, and for folders (they are walked)."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return None if stat.S_ISDIR(info.st_mode) else (info.st_size, info.st_mtime_ns)


class Stability:
    """Candidates and when their size and mtime last changed; a candidate is ready once they
    have not changed for `stable_s`."""

    def __init__(self, stable_s: float):
        self.stable_s = stable_s
        self.seen: dict[Path, tuple[Stamp, float]] = {}

    def offer(self, paths: Iterable[Path], now: float) -> None:
        for path in paths:
            stamp = _stamp(path)
            if stamp is not None and self.seen.get(path, (None, 0.0))[0] != stamp:
                self.seen[path] = (stamp, now)

    def trust(self, paths: Iterable[Path]) -> None:
        """Paths known to be complete (written and renamed into place): ready at once."""
        for path in paths:
            if (stamp := _stamp(path)) is not None:
                self.seen[path] = (stamp, float("-inf"))

    def take_ready(self, now: float) -> list[Path]:
        """The candidates unchanged for long enough, in name order; they are forgotten here."""
        ready = []
        for path, (stamp, since) in list(self.seen.items()):
            current = _stamp(path)
            if current is None:
                del self.seen[path]
            elif current != stamp:
                self.seen[path] = (current, now)
            elif now - since >= self.stable_s:
                ready.append(path)
                del self.seen[path]
        return sorted(ready)

    @property
    def waiting(self) -> bool:
        return bool(self.seen)


class _Events(FileSystemEventHandler):
    """Collects the paths watchdog reports; a folder event asks for a full scan."""

    def __init__(self, wake: threading.Event):
        self.wake = wake
        self.lock = threading.Lock()
        self.paths: set[Path] = set()
        self.rescan = False

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        with self.lock:
            if event.is_directory:  # a folder made or moved in brings files no event names
                self.rescan = self.rescan or event.event_type in ("created", "moved")
                return
            for path in (event.src_path, getattr(event, "dest_path", "")):
                if path:
                    self.paths.add(Path(os.fsdecode(path)))
        self.wake.set()

    def drain(self) -> tuple[set[Path], bool]:
        with self.lock:
            paths, rescan = self.paths, self.rescan
            self.paths, self.rescan = set(), False
        return paths, rescan


class Watcher:
    """The daemon's inbox watcher thread: `start()`, then `stop()` (returns within its timeout)."""

    def __init__(self, settings: Settings, journal: Journal | None = None, chunker: ChunkerSource | None = None):
        assert settings.watch.inbox is not None, "load_settings resolves watch.inbox"
        self.settings = settings
        self.inbox = settings.watch.inbox
        self.journal, self.chunker = journal, chunker
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.events = _Events(self.wake)
        self.thread = threading.Thread(target=self._run, name="cld-watch", daemon=True)
        self.error: str | None = None  # why intake fails now (status shows it); None while it works

    def start(self) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.thread.start()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                log.warning("the inbox watcher did not stop within %.0f s", timeout_s)

    def _run(self) -> None:
        try:
            with open_ingester(self.settings, self.stopping, self.chunker, self.journal) as ingester:
                log.info("watching %s for documents", self.inbox)
                observer = Observer(timeout=POLL_S)
                observer.schedule(self.events, str(self.inbox), recursive=True)
                observer.start()
                try:
                    self._loop(ingester)
                finally:
                    observer.stop()
                    observer.join(STOP_TIMEOUT_S)
        except IngestBusy:
            return  # stopped while another process held the lock
        except Exception as error:
            self.error = f"the inbox watcher stopped: {error}"
            log.exception("the inbox watcher stopped; files dropped in the inbox wait for the next start")

    def _loop(self, ingester: Ingester) -> None:
        stability = Stability(self.settings.watch.stable_s)
        next_scan = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            paths, rescan = self.events.drain()
            stability.offer((path for path in paths if _visible(path, self.inbox)), now)
            if rescan or now >= next_scan:
                stability.offer(walk(self.inbox), now)
                next_scan = now + self.settings.watch.rescan_s
            self._take(ingester, stability.take_ready(now))
            self.wake.wait(POLL_S)
            self.wake.clear()

    def _take(self, ingester: Ingester, paths: list[Path]) -> None:
        for path in paths:
            if self.stopping.is_set() or is_ignored(path.name):
                return
            try:
                ingester.ingest(path)
                self.error = None
            except Exception as error:  # e.g. a full disk: the next full scan offers the file again
                self.error = f"ingesting {path.name} failed: {error}"
                log.exception("ingesting %s failed; it stays in the inbox", path)
        try:
            ingester.flush()
            ingester.chunk_pending()
        except Exception as error:
            self.error = f"the journal could not be written: {error}"
            log.exception("the journal could not be written; will try again")


def ingest_inbox(ingester: Ingester, settings: Settings, complete: Iterable[Path] = (),
                 stop: threading.Event | None = None) -> list[Recorded]:
    """Ingest what the inbox holds now: `complete` paths at once, others once they have been
    unchanged for `watch.stable_s` (waited for once); then chunk what is pending."""
    assert settings.watch.inbox is not None
    stability = Stability(settings.watch.stable_s)
    stability.offer(walk(settings.watch.inbox), time.monotonic())
    stability.trust(complete)
    found = [ingester.ingest(path) for path in stability.take_ready(time.monotonic())]
    if stability.waiting and not (stop or threading.Event()).wait(settings.watch.stable_s):
        found += [ingester.ingest(path) for path in stability.take_ready(time.monotonic())]
    ingester.flush()
    ingester.chunk_pending()
    return [recorded for recorded in found if recorded is not None]


def main(argv: list[str]) -> int:
    """Ingest the inbox once (the daemon must not be running): `python -m daemon.ingestion.watch [--config PATH]`."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    config = Path(argv[1]) if len(argv) == 2 and argv[0] == "--config" else None
    try:
        settings = load_settings(config)
        logs.setup(settings.log)  # [log] format and level, as the daemon logs
        with open_ingester(settings) as ingester:
            found = ingest_inbox(ingester, settings)
    except (ConfigError, IngestBusy) as error:
        log.error("%s", error)
        return 2
    log.info("ingested %d files", len(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

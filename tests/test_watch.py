"""The inbox watcher: candidates, the stability rule, the watcher thread, `cld ingest`."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.ingestion import journal
from daemon.ingestion.ingest import open_ingester
from daemon.ingestion.submit import ingest_paths
from daemon.ingestion.watch import Stability, Watcher, is_ignored, walk
from daemon.layout import StateDir
from tests.ingest_helpers import make_settings

WAIT_S = 20.0


def eventually(check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def counts(settings: Settings) -> dict[str, int]:
    return journal.counts(StateDir(settings.state.dir).journal)


# candidates -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ignored", [
    ("notes.md", False), ("a.txt", False), (".notes.md", True), ("a.txt.part", True), ("a.tmp", True),
    ("b.TMP", True), ("c.crdownload", True), ("notes.md~", True), (".x.part", True),
])
def test_temporary_and_hidden_names_are_ignored(name: str, ignored: bool) -> None:
    assert is_ignored(name) is ignored


def test_walk_enters_subfolders_but_not_hidden_ones_nor_links(tmp_path: Path) -> None:
    for name in ("a.txt", "sub/b.md", "sub/deeper/c.html", ".git/config.txt", "sub/.d.txt", "e.part"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "linked").symlink_to(tmp_path / "sub")
    assert [p.relative_to(tmp_path).as_posix() for p in walk(tmp_path)] == [
        "a.txt", "linked", "sub/b.md", "sub/deeper/c.html"]


# stability ------------------------------------------------------------------------------------

def test_a_file_is_ready_once_unchanged_for_stable_s(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("part")
    stability = Stability(stable_s=2.0)
    stability.offer([path], now=100.0)
    assert stability.take_ready(101.0) == []
    with open(path, "a") as handle:
        handle.write(" and more")
    assert stability.take_ready(102.5) == []   # it changed: the clock starts again
    assert stability.take_ready(104.0) == []
    assert stability.take_ready(104.5) == [path]
    assert not stability.waiting


def test_offering_an_unchanged_file_again_does_not_restart_its_clock(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x")
    stability = Stability(stable_s=2.0)
    stability.offer([path], now=100.0)
    stability.offer([path], now=101.5)
    assert stability.take_ready(102.0) == [path]


def test_vanished_files_are_forgotten_and_trusted_ones_are_ready_at_once(tmp_path: Path) -> None:
    gone, trusted = tmp_path / "gone.txt", tmp_path / "trusted.txt"
    gone.write_text("x")
    trusted.write_text("y")
    stability = Stability(stable_s=60.0)
    stability.offer([gone, trusted, tmp_path / "never.txt"], now=0.0)
    stability.trust([trusted])
    gone.unlink()
    assert stability.take_ready(1.0) == [trusted]
    assert not stability.waiting


# the watcher thread ---------------------------------------------------------------------------

def watcher_settings(tmp_path: Path, stable_s: float = 0.3, rescan_s: float = 60.0) -> Settings:
    settings = make_settings(tmp_path)
    settings.watch.stable_s, settings.watch.rescan_s = stable_s, rescan_s
    return settings


def test_the_watcher_takes_old_and_new_files_and_stops_promptly(tmp_path: Path) -> None:
    settings = watcher_settings(tmp_path)
    inbox = settings.watch.inbox
    inbox.mkdir(parents=True)
    (inbox / "before.txt").write_text("Dropped while the daemon was down.")
    watcher = Watcher(settings)
    watcher.start()
    try:
        eventually(lambda: counts(settings)["ingested"] == 1)  # the start-up scan
        (inbox / "team/2024").mkdir(parents=True)
        (inbox / "team/2024/new.md").write_text("Dropped into a new subfolder.")
        (inbox / "bad.docx").write_bytes(b"PK")
        (inbox / "still-copying.txt.part").write_text("ignored")
        (inbox / ".git").mkdir()
        (inbox / ".git/config.txt").write_text("in a hidden folder: ignored")
        eventually(lambda: counts(settings)["ingested"] == 2 and counts(settings)["quarantined"] == 1)
    finally:
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 5
    assert not watcher.thread.is_alive()
    assert sorted(p.name for p in inbox.rglob("*") if p.is_file()) == ["config.txt", "still-copying.txt.part"]
    assert (settings.state.dir / "processed/team/2024/new.md").exists()


def test_a_file_still_being_written_is_taken_once_complete(tmp_path: Path) -> None:
    settings = watcher_settings(tmp_path, stable_s=0.6)
    settings.watch.inbox.mkdir(parents=True)
    watcher = Watcher(settings)
    watcher.start()
    try:
        path = settings.watch.inbox / "slow.txt"
        with open(path, "w") as handle:
            for part in range(5):
                handle.write(f"part {part} ")
                handle.flush()
                time.sleep(0.2)
        eventually(lambda: counts(settings)["ingested"] == 1)
    finally:
        watcher.stop()
    with open_ingester(settings) as ingester:
        document = ingester.journal.documents("ready")[0]
        assert ingester.journal.records(document["id"]) == [{"text": " ".join(f"part {i}" for i in range(5))}]
        assert len(ingester.journal.inputs()) == 1


def test_a_folder_moved_in_whole_is_walked(tmp_path: Path) -> None:
    settings = watcher_settings(tmp_path, stable_s=0.1)
    settings.watch.inbox.mkdir(parents=True)
    outside = tmp_path / "batch"
    (outside / "inner").mkdir(parents=True)
    for i in range(3):
        (outside / "inner" / f"{i}.txt").write_text(f"document {i}")
    watcher = Watcher(settings)
    watcher.start()
    try:
        time.sleep(0.3)
        os.rename(outside, settings.watch.inbox / "batch")
        eventually(lambda: counts(settings)["ingested"] == 3)
    finally:
        watcher.stop()


def test_a_watcher_waiting_for_the_lock_still_stops(tmp_path: Path) -> None:
    settings = watcher_settings(tmp_path)
    with open_ingester(settings):  # another process is ingesting
        watcher = Watcher(settings)
        watcher.start()
        time.sleep(0.2)
        watcher.stop(timeout_s=3)
        assert not watcher.thread.is_alive()


# cld ingest -----------------------------------------------------------------------------------

def test_ingest_paths_without_a_daemon_ingests_here(tmp_path: Path) -> None:
    settings = watcher_settings(tmp_path, stable_s=30)  # hand-ins are complete: no waiting for them
    (tmp_path / "docs/sub").mkdir(parents=True)
    (tmp_path / "docs/a.md").write_text("Alpha.")
    (tmp_path / "docs/sub/b.txt").write_text("Alpha.")
    (tmp_path / "docs/c.bin").write_bytes(b"\x00")
    (tmp_path / "d.txt").write_bytes(b"\x00\x01")
    started = time.monotonic()
    outcomes = ingest_paths(settings, [tmp_path / "docs", tmp_path / "d.txt"], wait_s=5)
    assert time.monotonic() - started < 10
    assert [(o.source.name, o.recorded.outcome if o.recorded else o.refused[:16]) for o in outcomes] == [
        ("a.md", "document"), ("c.bin", "unsupported type"), ("b.txt", "duplicate"), ("d.txt", "quarantined")]


def test_ingest_of_a_folder_never_follows_a_link_in_it(tmp_path: Path) -> None:
    """The second adversarial test: links in a folder given to `cld ingest` took a secret file and
    state/vllm.key (mode 600) into processed/ (mode 644), to be learned and recited."""
    settings = watcher_settings(tmp_path, stable_s=30)
    secret = tmp_path / "secret.txt"
    secret.write_text("the admin password is hunter2")
    secret.chmod(0o600)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/notes.txt").write_text("Plain notes.")
    (tmp_path / "docs/key.txt").symlink_to(secret)
    (tmp_path / "docs/inner.txt").symlink_to(tmp_path / "docs/notes.txt")  # even one inside the folder
    outcomes = ingest_paths(settings, [tmp_path / "docs"], wait_s=5)
    refused = {o.source.name: o.refused for o in outcomes if o.refused}
    assert set(refused) == {"key.txt", "inner.txt"} and "links inside a folder are not followed" in refused["key.txt"]
    assert [o.source.name for o in outcomes if o.recorded] == ["notes.txt"]
    state = settings.state.dir
    assert not [p for p in state.rglob("*") if p.is_file() and "hunter2" in p.read_bytes().decode(errors="ignore")]
    named = ingest_paths(settings, [tmp_path / "docs/key.txt"], wait_s=5)  # named on the command line: taken
    assert named[0].recorded is not None and named[0].recorded.outcome == "document"


def test_ingest_paths_with_a_running_watcher_waits_for_it(tmp_path: Path) -> None:
    settings = watcher_settings(tmp_path, stable_s=0.1)
    (tmp_path / "a.txt").write_text("Handed to the daemon.")
    watcher = Watcher(settings)
    watcher.start()
    try:
        time.sleep(0.3)  # the watcher holds the ingest lock now
        outcomes = ingest_paths(settings, [tmp_path / "a.txt"], wait_s=WAIT_S)
    finally:
        watcher.stop()
    assert outcomes[0].recorded is not None and outcomes[0].recorded.outcome == "document"
    assert outcomes[0].recorded.moved


def test_a_failing_intake_is_reported_until_it_works_again(tmp_path: Path) -> None:
    """A journal that cannot be written (damaged mid-run, disk full) is not a silent queue: the
    watcher says why intake fails (`cld status`, /status show it), and clears it once it works."""
    from daemon.ingestion.watch import Watcher

    settings = make_settings(tmp_path)
    watcher = Watcher(settings)

    class Failing:
        fail = True

        def ingest(self, path: Path) -> None:
            if self.fail:
                raise sqlite3.DatabaseError("database disk image is malformed")

        def flush(self) -> None:
            pass

        def chunk_pending(self) -> int:
            return 0

    ingester = Failing()
    watcher._take(ingester, [tmp_path / "a.txt"])  # type: ignore[arg-type]
    assert watcher.error == "ingesting a.txt failed: database disk image is malformed"
    ingester.fail = False
    watcher._take(ingester, [tmp_path / "b.txt"])  # type: ignore[arg-type]
    assert watcher.error is None

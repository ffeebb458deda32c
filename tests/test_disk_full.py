"""A full disk loses and duplicates nothing: an input journaled whose quarantine note or move
failed is finished on the next try, never journaled again; an upload that does not fit gets an
OpenAI-shaped 507 and leaves nothing in the inbox. Uses a small tmpfs where the machine allows
mounting one (root), and an injected ENOSPC where exactness matters."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.ingestion import ingest, journal
from daemon.ingestion.ingest import open_ingester
from daemon.layout import StateDir
from tests.ingest_helpers import make_settings
from tests.test_upload import client, inbox_files


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (skipped where this process may not mount one)."""
    yield from tmpfs(tmp_path / "small", "64k")


@pytest.fixture
def journal_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: room for a journal and its WAL, until it is filled."""
    yield from tmpfs(tmp_path / "journal", "1m")


def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def inputs(settings: Settings) -> list[journal.Recorded]:
    with open_ingester(settings) as opened:
        return opened.journal.inputs()


def test_a_failed_quarantine_note_is_finished_on_the_next_try_not_journaled_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path)
    settings.watch.inbox.mkdir(parents=True, exist_ok=True)
    empty = settings.watch.inbox / "empty.txt"
    empty.write_bytes(b"")
    real_write = ingest.atomic_write_text

    def disk_full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ingest, "atomic_write_text", disk_full)
    for _ in range(3):  # the watcher offers the file again at each scan
        with open_ingester(settings) as opened, pytest.raises(OSError):
            opened.ingest(empty)
    monkeypatch.setattr(ingest, "atomic_write_text", real_write)
    with open_ingester(settings) as opened:
        opened.ingest(empty)
    assert [(r.name, r.outcome) for r in inputs(settings)] == [("empty.txt", "quarantined")]
    state = StateDir(settings.state.dir)
    assert (state.quarantine / "empty.txt").is_file() and (state.quarantine / "empty.txt.reason").is_file()
    assert not empty.exists()
    assert journal.counts(state.journal)["quarantined"] == 1


def test_a_document_journaled_before_the_disk_filled_is_counted_once(tmp_path: Path, small_disk: Path) -> None:
    settings = make_settings(tmp_path)
    state = StateDir(settings.state.dir)
    state.quarantine.mkdir(parents=True, exist_ok=True)
    (state.root / "quarantine").rmdir()
    (state.root / "quarantine").symlink_to(small_disk)  # quarantine/ on the small disk, the journal elsewhere
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle:  # fill the small disk
        try:
            while True:
                handle.write(b"x" * 4096)
        except OSError:
            pass
    settings.watch.inbox.mkdir(parents=True, exist_ok=True)
    bad = settings.watch.inbox / "bad.bin"
    bad.write_bytes(b"\x00\x01" * 100)
    with open_ingester(settings) as opened, pytest.raises(OSError):
        opened.ingest(bad)
    with open_ingester(settings) as opened, pytest.raises(OSError):
        opened.ingest(bad)
    filler.unlink()
    with open_ingester(settings) as opened:
        opened.ingest(bad)
    assert [(r.name, r.outcome) for r in inputs(settings)] == [("bad.bin", "quarantined")]
    assert (small_disk / "bad.bin.reason").read_text().startswith("unsupported")


async def test_an_upload_that_does_not_fit_gets_507_and_leaves_nothing(tmp_path: Path, small_disk: Path) -> None:
    inbox_parent = small_disk
    async with client(inbox_parent) as front:
        reply = await front.post("/api/documents", files={"file": ("big.txt", b"x" * 900)})
        assert reply.status_code == 202  # fits
        for number in range(200):  # until the disk is full
            reply = await front.post("/api/documents", files={"file": (f"more{number}.txt", b"y" * 900)})
            if reply.status_code != 202:
                break
    assert reply.status_code == 507, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["type"] == "insufficient_storage"
    assert all(not name.startswith(".") for name in inbox_files(inbox_parent)), "no partial file stays behind"


def fill(folder: Path) -> Path:
    """Fill the disk of `folder`; the file to delete to free it again."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"x" * 1024)
        except OSError:
            pass
    return filler


def test_a_full_disk_under_the_journal_is_said_so_not_called_damage(tmp_path: Path, journal_disk: Path) -> None:
    """The second adversarial test: with the disk full, `cld ingest` ended in an sqlite3 traceback,
    and with a few KB free the journal was called damaged and `cld journal rebuild` advised."""
    settings = make_settings(tmp_path)
    settings.state.dir = journal_disk / "state"
    settings.watch.inbox = tmp_path / "inbox"
    settings.watch.inbox.mkdir()
    with open_ingester(settings) as opened:
        (settings.watch.inbox / "first.txt").write_text("Zorblat has nine bridges.")
        opened.ingest(settings.watch.inbox / "first.txt")
    filler = fill(journal_disk)
    (settings.watch.inbox / "second.txt").write_text("The Quux river freezes in May. " * 40)
    for _ in range(2):  # opening the journal, then writing to it, on a full disk
        with pytest.raises(OSError) as raised:
            with open_ingester(settings) as opened:
                opened.ingest(settings.watch.inbox / "second.txt")
        assert raised.value.errno == errno.ENOSPC and "damaged" not in str(raised.value), raised.value
    filler.unlink()
    with open_ingester(settings) as opened:
        opened.ingest(settings.watch.inbox / "second.txt")
        assert [(r.name, r.outcome) for r in opened.journal.inputs()] == [("first.txt", "document"),
                                                                          ("second.txt", "document")]

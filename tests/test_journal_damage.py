"""A damaged or emptied journal is refused at start with a message naming the file and the
recovery command, never trusted silently; `cld journal rebuild` makes it anew from processed/
and quarantine/, keeping the old one, marks learned what promoted versions learned and sets aside
again what refused cycles set aside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.ingestion import journal
from daemon.ingestion.ingest import open_ingester
from daemon.ingestion.journal import DamagedJournal, Journal
from daemon.layout import CYCLES_DIR, StateDir
from daemon.learning.records import PROMOTED, REJECTED, CycleRecord, CycleStore
from replay.durable import atomic_write_json
from tests.conftest import REPO
from tests.ingest_helpers import make_settings

FILES = {"a.txt": b"Zorblat is the capital of Quux. It has nine bridges.",
         "b.md": b"# Notes\n\nThe Quux river freezes in May.",
         "copy-of-a.txt": b"Zorblat is the capital of Quux. It has nine bridges.",
         "empty.txt": b""}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A state directory after intake: 2 documents, 1 duplicate, 1 quarantined; v0001 learned a.txt,
    the candidates of cycles 2-4 (v0002-v0004) were refused with b.md, which is set aside."""
    made = make_settings(tmp_path)
    made.watch.inbox.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (made.watch.inbox / name).write_bytes(data)
    with open_ingester(made) as ingester:
        for name in FILES:
            ingester.ingest(made.watch.inbox / name)
        ingester.chunk_pending()
        first, second = ingester.journal.documents("ready")
        ingester.journal.mark_learned([first["id"]], "v0001")
        for cycle in (2, 3, 4):
            ingester.journal.refused([second["id"]], refusal(cycle), made.schedule.max_attempts)
    state = StateDir(made.state.dir)
    cycles = CycleStore(state.root / CYCLES_DIR)
    atomic_write_json(state.adapters / "v0001" / "meta.json", {"version": "v0001", "documents": [first["hash"]]})
    cycles.save(CycleRecord(id=1, trigger="api", state=PROMOTED, version="v0001"))
    for cycle in (2, 3, 4):
        version = f"v{cycle:04d}"
        atomic_write_json(state.adapters / version / "meta.json", {"version": version, "documents": [second["hash"]]})
        cycles.save(CycleRecord(id=cycle, trigger="api", state=REJECTED, version=version, failed=[
            {"probe": "forgetting_vs_base", "value": 0.03, "limit": 0.02, "passed": False,
             "reason": "forgetting vs base +3.0% > +2.0%"}]))
    return made


def refusal(cycle: int) -> str:
    """What the cycle writes when its candidate is refused (`Learner.set_aside`)."""
    return f"cycle {cycle} refused its candidate v{cycle:04d}: forgetting vs base +3.0% > +2.0%"


def cld(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    config = settings.state.dir.parent / "config.toml"
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


EXPECTED = {"ingested": 2, "pending": 0, "quarantined": 1, "learned": 1, "duplicates": 1, "ready": 0, "set_aside": 1}


def test_the_fixture_is_what_the_rebuild_must_restore(settings: Settings) -> None:
    assert journal.counts(StateDir(settings.state.dir).journal) == EXPECTED


@pytest.mark.parametrize("damage", ["emptied", "garbage", "mid-file"])
def test_a_damaged_journal_is_refused_naming_the_file_and_the_fix(settings: Settings, damage: str) -> None:
    path = StateDir(settings.state.dir).journal
    data = path.read_bytes()
    for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        companion.unlink(missing_ok=True)
    if damage == "emptied":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:  # a page in the middle overwritten: the header still says SQLite
        path.write_bytes(data[:4096] + b"\xff" * 4096 + data[8192:])
    with pytest.raises(DamagedJournal, match=rf"{path}.*cld journal rebuild"):
        Journal(path).close()  # what the daemon opens at start (integrity checked)
    if damage == "mid-file":
        return  # status reads without the full check (it runs every scrape): the daemon's start finds it
    status = cld(settings, "status")
    assert status.returncode == 2 and "cld journal rebuild" in status.stderr and "Traceback" not in status.stderr


def test_a_new_state_directory_with_an_empty_journal_file_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"")
    Journal(path).close()


def test_cld_journal_rebuild_restores_the_counts_and_keeps_the_old_journal(settings: Settings) -> None:
    state = StateDir(settings.state.dir)
    state.journal.write_bytes(b"")
    done = cld(settings, "journal", "rebuild")
    assert done.returncode == 0, done.stderr
    assert "journal rebuilt: 2 documents (1 learned, 1 set aside), 1 duplicates, 1 quarantined" in done.stdout
    assert journal.counts(state.journal) == EXPECTED
    (aside,) = Journal(state.journal).documents("set_aside")
    assert aside["source"].endswith("b.md") and aside["attempts"] == 3 and aside["set_aside"] == refusal(4)
    kept = [p.name for p in state.root.iterdir() if p.name.startswith("journal.sqlite3.damaged-")]
    assert kept and kept[0].startswith("journal.sqlite3.damaged-")
    with open_ingester(settings) as ingester:
        reasons = [r.reason for r in ingester.journal.inputs() if r.outcome == "quarantined"]
    assert reasons == ["empty: the file has no bytes"]


def test_a_damaged_serving_json_names_the_file(settings: Settings) -> None:
    StateDir(settings.state.dir).serving.write_text("{not json")
    status = cld(settings, "status")
    assert status.returncode == 2 and "serving.json is damaged" in status.stderr and "Traceback" not in status.stderr


def test_a_rebuild_keeps_the_first_of_two_identical_files_and_an_input_named_like_a_note(tmp_path: Path) -> None:
    """The second adversarial test: the rebuild took the later of two identical files as the
    original (it went by name), and skipped a quarantined input named notes.txt.reason."""
    import time

    from daemon.ingestion.rebuild import rebuild

    made = make_settings(tmp_path)
    made.watch.inbox.mkdir(parents=True, exist_ok=True)
    with open_ingester(made) as ingester:
        for name, data in (("zeta-original.txt", b"Zorblat has nine bridges."), ("alpha-copy.txt", b"Zorblat has "
                           b"nine bridges."), ("notes.txt.reason", b""), ("plain.txt", b"")):
            (made.watch.inbox / name).write_bytes(data)
            ingester.ingest(made.watch.inbox / name)
            time.sleep(0.01)  # taken in this order
        before = journal.counts(StateDir(made.state.dir).journal)
        [document] = ingester.journal.documents("pending") or ingester.journal.documents("ready")
    assert document["source"] == "zeta-original.txt" and before["quarantined"] == 2

    rebuilt = rebuild(made, learned=[])
    assert (rebuilt.documents, rebuilt.duplicates, rebuilt.quarantined) == (1, 1, 2)
    again = Journal(StateDir(made.state.dir).journal)
    try:
        [document] = again.documents("pending") or again.documents("ready")
        assert document["source"] == "zeta-original.txt"
    finally:
        again.close()

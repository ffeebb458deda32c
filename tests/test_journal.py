"""The journal: documents deduplicated by hash, inputs accounted for, chunks, states, counts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from daemon.ingestion import journal
from daemon.ingestion.journal import EMPTY_COUNTS, Input, Journal

TEXT = [{"text": "Zorblat is the capital of Quux."}]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite3"


@pytest.fixture
def book(path: Path):
    opened = Journal(path)
    yield opened
    opened.close()


def item(name: str, size: int = 10) -> Input:
    return Input(name, size, 1_700_000_000_000_000_000)


def test_a_new_content_is_a_document_and_the_same_again_a_duplicate(book: Journal, path: Path) -> None:
    first = book.accept(item("a.txt"), "processed/a.txt", "h1", TEXT)
    again = book.accept(item("b.md"), "processed/b.md", "h1", TEXT)
    other = book.accept(item("c.txt"), "processed/c.txt", "h2", [{"text": "other"}])
    assert (first.outcome, again.outcome, other.outcome) == ("document", "duplicate", "document")
    assert again.document_id == first.document_id != other.document_id
    assert book.records(first.document_id) == TEXT
    assert journal.counts(path) == {**EMPTY_COUNTS, "ingested": 2, "pending": 2, "duplicates": 1}


def test_quarantine_keeps_the_reason(book: Journal, path: Path) -> None:
    recorded = book.quarantine(item("x.bin"), "quarantine/x.bin", "unsupported type: '.bin'")
    assert (recorded.outcome, recorded.reason) == ("quarantined", "unsupported type: '.bin'")
    assert recorded.document_id is None
    assert journal.counts(path)["quarantined"] == 1
    assert journal.counts(path)["ingested"] == 0


def test_inputs_stay_unmoved_until_marked(book: Journal) -> None:
    first = book.accept(item("a.txt"), "processed/a.txt", "h1", TEXT)
    second = book.quarantine(item("b.txt"), "quarantine/b.txt", "empty")
    assert [r.id for r in book.unmoved()] == [first.id, second.id]
    book.mark_moved([first.id])
    assert [r.id for r in book.unmoved()] == [second.id]
    assert [r.moved for r in book.inputs()] == [True, False]


def test_chunks_make_a_document_ready_and_redoing_them_is_harmless(book: Journal) -> None:
    doc = book.accept(item("a.txt"), "processed/a.txt", "h1", TEXT).document_id
    assert book.pending() == [doc]
    chunks = [(3, {"text": "one two three"}), (2, {"text": "three four"})]
    assert book.set_chunks(doc, chunks) == 5
    assert book.set_chunks(doc, chunks) == 5
    assert book.pending() == []
    assert book.chunks([doc]) == [record for _, record in chunks]
    assert [d["tokens"] for d in book.documents("ready")] == [5]


def test_learned_documents_name_their_version(book: Journal, path: Path) -> None:
    ready = book.accept(item("a.txt"), "processed/a.txt", "h1", TEXT).document_id
    pending = book.accept(item("b.txt"), "processed/b.txt", "h2", [{"text": "b"}]).document_id
    book.set_chunks(ready, [(1, {"text": "a"})])
    book.mark_learned([ready, pending], "v0001")  # only ready documents can be learned
    assert [(d["id"], d["version"]) for d in book.documents("learned")] == [(ready, "v0001")]
    assert journal.counts(path) == {**EMPTY_COUNTS, "ingested": 2, "pending": 1, "learned": 1}
    book.set_chunks(ready, [(9, {"text": "again"})])  # a learned document stays learned
    assert book.documents("learned")[0]["id"] == ready


def test_a_failed_write_leaves_nothing_behind(book: Journal) -> None:
    doc = book.accept(item("a.txt"), "processed/a.txt", "h1", TEXT).document_id
    book.set_chunks(doc, [(1, {"text": "kept"})])
    with pytest.raises(TypeError):
        book.set_chunks(doc, [(1, {"text": "new"}), (1, {"text": object()})])
    assert book.chunks([doc]) == [{"text": "kept"}]
    insert = "INSERT INTO documents (hash, source, bytes, state, added_at) VALUES ('h9', 's', 1, 'pending', 0)"
    with pytest.raises(sqlite3.IntegrityError):
        with book._write() as db:
            db.execute(insert)
            db.execute(insert)
    assert [d["hash"] for d in book.documents("pending")] == []


def test_readers_see_nothing_before_the_journal_exists(path: Path) -> None:
    assert journal.counts(path) == EMPTY_COUNTS
    assert journal.outcome(path, "a.txt") is None
    assert journal.last_input_id(path) == 0
    assert not path.exists()


def test_readers_see_nothing_while_the_tables_are_being_made(path: Path) -> None:
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()  # the writer has only just opened it
    assert journal.counts(path) == EMPTY_COUNTS
    assert journal.last_input_id(path) == 0


def test_outcome_is_the_latest_record_after_a_given_one(book: Journal, path: Path) -> None:
    old = book.accept(item("a.txt"), "processed/a.txt", "h1", TEXT)
    assert journal.last_input_id(path) == old.id
    assert journal.outcome(path, "a.txt", after=old.id) is None
    new = book.quarantine(item("a.txt"), "quarantine/a.txt", "empty")
    assert journal.outcome(path, "a.txt", after=old.id) == new
    assert journal.outcome(path, "a.txt").id == new.id


def test_reopening_keeps_everything(path: Path) -> None:
    first = Journal(path)
    first.accept(item("a.txt"), "processed/a.txt", "h1", TEXT)
    first.close()
    second = Journal(path)
    try:
        assert second.accept(item("b.txt"), "processed/b.txt", "h1", TEXT).outcome == "duplicate"
        assert second.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        second.close()


def test_documents_refused_too_often_are_set_aside_until_retried(book: Journal, path: Path) -> None:
    ids = [book.accept(item(f"{n}.txt"), f"processed/{n}.txt", n, TEXT).document_id for n in ("a", "b")]
    for doc in ids:
        book.set_chunks(doc, [(1, {"text": "x"})])
    assert book.refused(ids, "cycle 1 refused v0001: cloze 0.25 < 0.50", max_attempts=2) == []
    aside = book.refused(ids[:1], "cycle 2 refused v0002: cloze 0.12 < 0.50", max_attempts=2)
    assert [(d["id"], d["attempts"], d["set_aside"]) for d in aside] == \
        [(ids[0], 2, "cycle 2 refused v0002: cloze 0.12 < 0.50")]
    assert [d["id"] for d in book.documents("ready")] == [ids[1]], "a set-aside document joins no cycle"
    assert journal.counts(path) == {**EMPTY_COUNTS, "ingested": 2, "pending": 1, "ready": 1, "set_aside": 1}
    assert [(d["id"], d["why"]) for d in journal.set_aside(path)] == [(ids[0], aside[0]["set_aside"])]
    assert [d["id"] for d in book.retry()] == [ids[0]]
    assert [(d["id"], d["attempts"]) for d in book.documents("ready")] == [(ids[0], 0), (ids[1], 1)]
    assert book.refused(ids, "again", max_attempts=0) == [], "0 = never set aside"


def test_a_journal_of_schema_1_is_brought_up_to_date(path: Path) -> None:
    old = sqlite3.connect(path)
    old.executescript(journal.SCHEMA.replace(",\n    attempts INTEGER NOT NULL DEFAULT 0,\n    set_aside TEXT", "")
                      + "\nPRAGMA user_version = 1;")
    old.execute("INSERT INTO documents (hash, source, bytes, tokens, state, added_at) VALUES ('h1', 'a.txt', 1, 1, "
                "'ready', 0)")
    old.commit()
    assert "attempts" not in {row[1] for row in old.execute("PRAGMA table_info(documents)")}
    old.close()
    assert journal.set_aside(path) == [] and journal.counts(path)["ready"] == 1, "readers cope before the upgrade"
    book = Journal(path)
    try:
        assert [(d["source"], d["attempts"], d["set_aside"]) for d in book.documents("ready")] == [("a.txt", 0, None)]
        assert book.db.execute("PRAGMA user_version").fetchone()[0] == journal.SCHEMA_VERSION
    finally:
        book.close()

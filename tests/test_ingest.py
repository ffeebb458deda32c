"""Ingestion of inbox files: documents, duplicates, every quarantine reason, crash recovery,
handing files in; and junk of any kind never stops the ingester."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from daemon.config import Settings
from daemon.ingestion import journal, readers
from daemon.ingestion.chunking import (
    Chunker,
    content_hash,
    load_tokenizer,
    normalise_records,
)
from daemon.ingestion.inbox import (
    HandInError,
    TooLarge,
    free_path,
    hand_in,
    reason_path,
    safe_name,
)
from daemon.ingestion.ingest import IngestBusy, Ingester, open_ingester
from daemon.ingestion.journal import Input
from daemon.ingestion.readers import UnsupportedType
from daemon.ingestion.watch import ingest_inbox
from daemon.layout import StateDir
from tests.ingest_helpers import BAD, GOOD, jsonl, make_settings, pdf_bytes


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def ingester(settings: Settings):
    with open_ingester(settings) as opened:
        yield opened


def drop(settings: Settings, name: str, data: bytes) -> Path:
    path = settings.watch.inbox / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def counts(settings: Settings) -> dict[str, int]:
    return journal.counts(StateDir(settings.state.dir).journal)


def reason_of(settings: Settings, recorded: journal.Recorded) -> str:
    return reason_path(settings.state.dir / recorded.stored_as).read_text()


# good files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GOOD))
def test_each_type_becomes_a_chunked_document_and_moves_to_processed(settings: Settings, ingester: Ingester,
                                                                     name: str) -> None:
    path = drop(settings, name, GOOD[name])
    recorded = ingester.ingest(path)
    assert recorded.outcome == "document" and recorded.moved is False  # the record from before the move
    assert not path.exists()
    assert (settings.state.dir / "processed" / name).read_bytes() == GOOD[name]
    assert not journal.outcome(StateDir(settings.state.dir).journal, name).moved  # marked with the next commit
    ingester.flush()
    assert journal.outcome(StateDir(settings.state.dir).journal, name).moved
    chunks = ingester.journal.chunks([recorded.document_id])
    assert chunks and ingester.journal.pending() == []
    assert all(set(chunk) in ({"text"}, {"prompt", "completion"}, {"messages"}) for chunk in chunks)


def test_instruction_records_keep_their_roles(settings: Settings, ingester: Ingester) -> None:
    recorded = ingester.ingest(drop(settings, "chat.jsonl", GOOD["chat.jsonl"]))
    chunks = ingester.journal.chunks([recorded.document_id])
    assert chunks[0]["messages"][1] == {"role": "assistant", "content": "Zorblat."}
    assert chunks[1] == {"prompt": "Founded?", "completion": "In 2071."}


def test_long_texts_are_cut_into_overlapping_chunks(settings: Settings, ingester: Ingester) -> None:
    text = " ".join(f"w{i}" for i in range(100))
    recorded = ingester.ingest(drop(settings, "long.txt", text.encode()))
    chunks = [c["text"].split() for c in ingester.journal.chunks([recorded.document_id])]
    assert [len(c) for c in chunks] == [16] * 8  # chunk_tokens 16, overlap 4: starts 0, 12, ..., 84
    assert chunks[0][-4:] == chunks[1][:4]
    assert ingester.journal.documents("ready")[0]["tokens"] == 128


def test_subfolders_are_kept_in_processed(settings: Settings, ingester: Ingester) -> None:
    ingester.ingest(drop(settings, "team/notes/a.md", b"Team notes."))
    assert (settings.state.dir / "processed/team/notes/a.md").read_bytes() == b"Team notes."


def test_a_name_seen_before_gets_a_free_name_in_processed(settings: Settings, ingester: Ingester) -> None:
    first = ingester.ingest(drop(settings, "a.txt", b"first"))
    second = ingester.ingest(drop(settings, "a.txt", b"second"))
    assert (first.stored_as, second.stored_as) == ("processed/a.txt", "processed/a.1.txt")
    assert (settings.state.dir / "processed/a.1.txt").read_bytes() == b"second"


# dedup ----------------------------------------------------------------------------------------

def test_the_same_text_twice_is_one_document(settings: Settings, ingester: Ingester) -> None:
    outcomes = [ingester.ingest(drop(settings, name, data)).outcome for name, data in [
        ("a.txt", b"Zorblat is the capital."),
        ("b.md", b"Zorblat  is the capital.\r\n"),           # same text once normalised
        ("c.html", b"<p>Zorblat is the capital.</p>"),        # same text once extracted
        ("d.jsonl", jsonl({"text": "Zorblat is the capital.", "id": 1})),
        ("e.txt", b"Zorblat is the capital!"),
    ]]
    assert outcomes == ["document", "duplicate", "duplicate", "duplicate", "document"]
    assert counts(settings) == {"ingested": 2, "pending": 2, "quarantined": 0, "learned": 0, "duplicates": 3, "ready": 2,
                               "set_aside": 0}
    assert len(list((settings.state.dir / "processed").iterdir())) == 5  # every file is kept and accounted


# quarantine -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_file_is_quarantined_beside_its_reason(settings: Settings, ingester: Ingester, name: str) -> None:
    data, words = BAD[name]
    recorded = ingester.ingest(drop(settings, name, data))
    assert recorded.outcome == "quarantined" and words in recorded.reason
    assert (settings.state.dir / "quarantine" / name).read_bytes() == data
    reason = reason_of(settings, recorded)
    assert reason.startswith(recorded.reason) and name in reason
    assert counts(settings)["quarantined"] == 1 and counts(settings)["ingested"] == 0


def test_a_file_over_the_size_limit_is_quarantined_unread(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "max_file_mb = 0.001\n")  # appended to [ingest]
    with open_ingester(settings) as ingester:
        recorded = ingester.ingest(drop(settings, "big.txt", b"x " * 1000))
    assert recorded.reason.startswith("too large: 0.002 MB is over ingest.max_file_mb = 0.001")


def test_a_symlink_out_of_the_inbox_escapes_it(settings: Settings, ingester: Ingester, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    link = settings.watch.inbox / "innocent.txt"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    recorded = ingester.ingest(link)
    assert recorded.reason.startswith("escapes the inbox") and str(secret) in recorded.reason
    moved = settings.state.dir / "quarantine/innocent.txt"
    assert moved.is_symlink() and secret.read_text() == "do not read me"
    assert ingester.journal.documents("ready") == []


def test_a_symlinked_folder_out_of_the_inbox_escapes_it(settings: Settings, ingester: Ingester,
                                                         tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/a.txt").write_text("outside")
    settings.watch.inbox.mkdir(parents=True, exist_ok=True)
    (settings.watch.inbox / "docs").symlink_to(tmp_path / "elsewhere")
    assert ingester.ingest(settings.watch.inbox / "docs/a.txt") is None  # never read through the link
    recorded = ingester.ingest(settings.watch.inbox / "docs")
    assert recorded.reason.startswith("escapes the inbox")
    assert (tmp_path / "elsewhere/a.txt").read_text() == "outside"


def test_a_symlink_inside_the_inbox_is_not_followed(settings: Settings, ingester: Ingester) -> None:
    target = drop(settings, "real.txt", b"real")
    (settings.watch.inbox / "alias.txt").symlink_to(target)
    assert ingester.ingest(settings.watch.inbox / "alias.txt").reason.startswith("a symlink")


def test_a_pipe_is_quarantined_without_blocking(settings: Settings, ingester: Ingester) -> None:
    settings.watch.inbox.mkdir(parents=True, exist_ok=True)
    os.mkfifo(settings.watch.inbox / "pipe.txt")
    assert ingester.ingest(settings.watch.inbox / "pipe.txt").reason.startswith("not a regular file")


def test_a_reader_that_breaks_quarantines_the_file(settings: Settings, ingester: Ingester, monkeypatch) -> None:
    def broken(data: bytes, limits: readers.ReadLimits) -> list:
        raise RuntimeError("reader bug")

    monkeypatch.setitem(readers.READERS, ".txt", broken)
    recorded = ingester.ingest(drop(settings, "a.txt", b"fine text"))
    assert recorded.reason == "could not be read: RuntimeError: reader bug"


def test_a_vanished_file_is_skipped(settings: Settings, ingester: Ingester) -> None:
    assert ingester.ingest(settings.watch.inbox / "gone.txt") is None
    assert ingester.journal.inputs() == []


def test_free_path_never_reuses_a_name_or_its_reason(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("")
    (tmp_path / "x.1.txt.reason").write_text("")
    assert free_path(tmp_path, "x.txt") == tmp_path / "x.2.txt"
    (tmp_path / "sub").write_text("a file where a folder would go")
    assert free_path(tmp_path, "sub/y.txt") == tmp_path / "sub__y.txt"


# not prepared yet, crashes ----------------------------------------------------------------------

def test_without_a_tokenizer_documents_wait_pending_and_are_chunked_later(settings: Settings) -> None:
    tokenizer: list = []
    with open_ingester(settings, chunker=lambda: tokenizer[0] if tokenizer else None) as ingester:
        recorded = ingester.ingest(drop(settings, "a.txt", b"one two three"))
        assert recorded.outcome == "document" and ingester.journal.pending() == [recorded.document_id]
        assert not (settings.watch.inbox / "a.txt").exists()
        tokenizer.append(Chunker(load_tokenizer(Path(settings.model.base)), 16, 4))
        assert ingester.chunk_pending() == 1
        assert ingester.journal.chunks([recorded.document_id]) == [{"text": "one two three"}]


def test_the_base_model_is_found_once_prepared(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, model=tmp_path / "not-yet")
    (tmp_path / "not-yet").mkdir()
    with open_ingester(settings) as ingester:
        assert ingester.chunker() is None  # no config.json: not a model folder (yet); logged, not raised


def as_found(path: Path, name: str) -> Input:
    info = path.lstat()
    return Input(name, info.st_size, info.st_mtime_ns)


def test_a_crash_between_commit_and_move_is_finished_on_restart(settings: Settings) -> None:
    good = drop(settings, "good.txt", b"committed, not moved")
    bad = drop(settings, "bad.pptx", b"x")
    records = normalise_records([{"text": "committed, not moved"}])
    with open_ingester(settings) as ingester:  # what ingest() commits, then the process dies
        ingester.journal.accept(as_found(good, "good.txt"), "processed/good.txt", content_hash(records), records)
        ingester.journal.quarantine(as_found(bad, "bad.pptx"), "quarantine/bad.pptx", "unsupported type: '.pptx'")
    with open_ingester(settings) as ingester:  # the restart recovers before it reads anything
        assert ingest_inbox(ingester, settings) == []
        inputs = ingester.journal.inputs()
    assert [(r.name, r.moved) for r in inputs] == [("good.txt", True), ("bad.pptx", True)]
    assert not good.exists() and not bad.exists()
    assert (settings.state.dir / "processed/good.txt").exists()
    assert reason_path(settings.state.dir / "quarantine/bad.pptx").read_text().startswith("unsupported type")
    assert counts(settings)["ingested"] == 1


def test_a_crash_between_move_and_mark_is_finished_on_restart(settings: Settings) -> None:
    path = drop(settings, "a.txt", b"moved, not marked")
    with open_ingester(settings) as ingester:
        recorded = ingester.journal.accept(as_found(path, "a.txt"), "processed/a.txt", "h", [{"text": "x"}])
        (settings.state.dir / "processed").mkdir()
        path.rename(settings.state.dir / "processed/a.txt")
    with open_ingester(settings) as ingester:
        assert ingester.journal.unmoved() == [] and ingester.journal.inputs()[0].id == recorded.id


def test_a_file_dropped_again_under_a_recorded_name_is_not_mistaken_for_it(settings: Settings) -> None:
    path = drop(settings, "a.txt", b"the recorded file")
    with open_ingester(settings) as ingester:
        ingester.journal.accept(as_found(path, "a.txt"), "processed/a.txt", "h", [{"text": "x"}])
        (settings.state.dir / "processed").mkdir()
        path.rename(settings.state.dir / "processed/a.txt")  # moved; then the process died
    drop(settings, "a.txt", b"a new file with the same name, dropped before the restart")
    with open_ingester(settings) as ingester:
        assert (settings.state.dir / "processed/a.txt").read_bytes() == b"the recorded file"
        assert [r.outcome for r in ingest_inbox(ingester, settings)] == ["document"]
    assert (settings.state.dir / "processed/a.1.txt").read_bytes().startswith(b"a new file")


def test_one_writer_at_a_time(settings: Settings, ingester: Ingester) -> None:
    with pytest.raises(IngestBusy):
        with open_ingester(settings):
            pass


# handing files in -----------------------------------------------------------------------------

@pytest.mark.parametrize("given_name, plain", [
    ("notes.md", "notes.md"),
    ("../../etc/passwd.txt", "passwd.txt"),
    ("C:\\Users\\me\\report.pdf", "report.pdf"),
    (".hidden.md", "hidden.md"),
    ("we\x00ird\nname?.txt", "we_ird_name_.txt"),
    ("x" * 300 + ".txt", "x" * 196 + ".txt"),
])
def test_uploaded_names_are_made_plain(given_name: str, plain: str) -> None:
    assert safe_name(given_name) == plain


@pytest.mark.parametrize("given_name", ["", "..", "../", "dir/", " . "])
def test_names_with_nothing_usable_are_refused(given_name: str) -> None:
    with pytest.raises(HandInError, match="no usable name"):
        safe_name(given_name)


def test_hand_in_writes_the_whole_file_under_a_free_name(tmp_path: Path) -> None:
    first = hand_in(tmp_path, "a.md", io.BytesIO(b"one"))
    second = hand_in(tmp_path, "../a.md", io.BytesIO(b"two"))
    assert (first.name, first.bytes, second.name) == ("a.md", 3, "a.1.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.1.md", "a.md"]  # no temporary file left


def test_hand_in_refuses_before_anything_appears(tmp_path: Path) -> None:
    with pytest.raises(TooLarge):
        hand_in(tmp_path, "big.txt", io.BytesIO(b"x" * 100), max_bytes=99)
    with pytest.raises(UnsupportedType):
        hand_in(tmp_path, "notes.tmp", io.BytesIO(b"x"))
    assert list(tmp_path.iterdir()) == []


# junk never stops the ingester -----------------------------------------------------------------

SUFFIXES = [".txt", ".md", ".html", ".pdf", ".jsonl", ".bin", ""]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["text", "prompt", "completion", "messages", "role", "content"]),
                               inner, max_size=3), max_leaves=8)
junk = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=500).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.lists(json_values, max_size=5).map(lambda values: jsonl(*values)),
    st.tuples(st.integers(0, 600), st.binary(min_size=1, max_size=8)).map(
        lambda cut: (lambda pdf: pdf[:cut[0]] + cut[1] + pdf[cut[0] + len(cut[1]):])(pdf_bytes("Some text."))),
)


def test_junk_never_crashes_the_ingester_and_every_file_is_accounted_for(settings: Settings,
                                                                         ingester: Ingester) -> None:
    names: list[str] = []

    @hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=junk, suffix=st.sampled_from(SUFFIXES))
    def ingest_junk(data: bytes, suffix: str) -> None:
        name = f"junk{len(names)}{suffix}"
        names.append(name)
        recorded = ingester.ingest(drop(settings, name, data))
        assert recorded is not None and recorded.outcome in ("document", "duplicate", "quarantined")
        assert not (settings.watch.inbox / name).exists()
        assert (settings.state.dir / recorded.stored_as).exists()
        if recorded.outcome == "quarantined":
            assert recorded.reason and reason_path(settings.state.dir / recorded.stored_as).exists()

    ingest_junk()
    assert sorted(r.name for r in ingester.journal.inputs()) == sorted(names)
    assert ingester.journal.pending() == []

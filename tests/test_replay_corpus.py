"""Corpus sources: formats, streaming, cutting into passages by tokens, the held-out rule."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay import corpus
from tests.replay_helpers import BagOfWords

SPANS = BagOfWords().spans


def cut(path: Path, passage_tokens: int = 24, text_field: str = "text") -> list[corpus.Passage]:
    return list(corpus.passages(path, text_field, SPANS, passage_tokens))


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_paragraphs_are_packed_up_to_the_token_limit(tmp_path: Path) -> None:
    path = tmp_path / "a.md"
    path.write_text(f"{words(10, 'a')}\n\n{words(10, 'b')}\n\n{words(10, 'c')}\n")
    passages = cut(path, passage_tokens=24)
    assert [p.tokens for p in passages] == [20, 10]
    assert passages[0].text == f"{words(10, 'a')}\n\n{words(10, 'b')}"


def test_a_long_paragraph_is_cut_at_token_boundaries_and_short_ones_dropped(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(words(50) + "\n\ntiny line\n")
    passages = cut(path, passage_tokens=20)
    assert [p.tokens for p in passages] == [20, 20, 12]  # the last 10 words + "tiny line"
    assert passages[0].text == words(20)
    assert all(p.tokens >= corpus.MIN_PASSAGE_TOKENS for p in passages)


def test_a_file_without_blank_lines_streams_in_bounded_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    line = words(20) + "\n"
    path.write_text(line * (3 * corpus.MAX_PARAGRAPH_CHARS // len(line)))
    paragraphs = list(corpus._file_paragraphs(path))
    assert len(paragraphs) >= 3
    assert max(map(len, paragraphs)) <= corpus.MAX_PARAGRAPH_CHARS + len(line)


def test_jsonl_records_are_documents_and_bad_lines_are_skipped(tmp_path: Path, caplog) -> None:
    path = tmp_path / "a.jsonl"
    records = [{"body": words(12, "x")}, {"body": words(12, "y")}, {"other": 1}]
    path.write_text("\n".join(map(json.dumps, records)) + "\nnot json\n")
    passages = cut(path, text_field="body")
    assert [p.text for p in passages] == [words(12, "x"), words(12, "y")]  # records are never packed together
    assert "skipped 2 lines" in caplog.text


def test_parquet_text_column(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": [words(12, "p"), None, words(12, "q")]}), path, row_group_size=1)
    assert [p.text for p in cut(path)] == [words(12, "p"), words(12, "q")]
    with pytest.raises(corpus.CorpusError, match="no column 'content'.*replay.text_field"):
        cut(path, text_field="content")


def test_source_files_walks_folders_in_order_and_names_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.md", "sub/c.jsonl", "skip.csv", ".hidden.txt"):
        (tmp_path / name).write_text("x")
    assert corpus.source_files([tmp_path]) == [tmp_path / "a.md", tmp_path / "b.txt", tmp_path / "sub/c.jsonl"]
    with pytest.raises(corpus.CorpusError, match="does not exist"):
        corpus.source_files([tmp_path / "missing"])
    with pytest.raises(corpus.CorpusError, match="skip.csv is not one of"):
        corpus.source_files([tmp_path / "skip.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(corpus.CorpusError, match="no .txt"):
        corpus.source_files([tmp_path / "empty"])


def test_held_out_rule_is_deterministic_and_takes_the_fraction() -> None:
    digests = [corpus.digest(f"passage {i}") for i in range(20_000)]
    held = [d for d in digests if corpus.is_held_out(d, 0.1)]
    assert 0.09 < len(held) / len(digests) < 0.11
    assert held == [d for d in digests if corpus.is_held_out(d, 0.1)]
    assert set(held) <= {d for d in digests if corpus.is_held_out(d, 0.2)}  # growing the fraction only adds
    assert not any(corpus.is_held_out(d, 0.0) for d in digests)


def test_fingerprint_follows_files_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one")
    first = corpus.fingerprint([path], {"passage_tokens": 10})
    assert first == corpus.fingerprint([path], {"passage_tokens": 10})
    assert first != corpus.fingerprint([path], {"passage_tokens": 11})
    path.write_text("two!")
    assert first != corpus.fingerprint([path], {"passage_tokens": 10})

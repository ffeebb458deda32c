"""Normalisation, content identity and chunking into overlapping token windows."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.ingestion import chunking
from daemon.ingestion.chunking import (
    MESSAGE_TOKENS,
    Chunker,
    content_hash,
    load_tokenizer,
    normalise,
    normalise_records,
)
from tests.ingest_helpers import tiny_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(tiny_model(tmp_path_factory.mktemp("tok")))


def words(count: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + count))


# normalisation --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    ("cafe\u0301", "café"),                                  # NFC
    ("a\r\nb\rc", "a\nb\nc"),                                # one kind of line break
    ("a\u2028b\x0cc", "a\nb\nc"),
    ("one   two\t\tthree\u00a0 four", "one two three four"),  # runs of spaces inside a line
    ("    indented code\n\tand a tab", "indented code\n\tand a tab"),  # indentation kept (but not at the start)
    ("x\n    y", "x\n    y"),
    ("line  \nnext\t", "line\nnext"),                        # trailing spaces
    ("a\n\n\n\n\nb", "a\n\nb"),                               # at most one blank line
    ("zero\u200bwidth\x07bell\ufeff", "zerowidthbell"),      # invisible and control characters
    ("  \n\n padded \n\n ", "padded"),
])
def test_normalise(raw: str, clean: str) -> None:
    assert normalise(raw) == clean


@given(st.text())
def test_normalise_is_idempotent(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once


def test_records_are_normalised_and_empty_texts_dropped() -> None:
    records = [{"text": "  a  b "}, {"text": " \n "}, {"prompt": "q ", "completion": " a"},
               {"messages": [{"role": " user ", "content": "hi  there"}]}]
    assert normalise_records(records) == [
        {"text": "a b"}, {"prompt": "q", "completion": "a"}, {"messages": [{"role": "user", "content": "hi there"}]}]


def test_the_same_text_differently_spaced_is_the_same_content() -> None:
    first = normalise_records([{"text": "Zorblat is\r\nthe capital.  "}])
    second = normalise_records([{"text": "Zorblat  is\nthe capital."}])
    assert content_hash(first) == content_hash(second)
    assert content_hash(first) != content_hash(normalise_records([{"text": "Zorblat is the capital"}]))


# chunking -------------------------------------------------------------------------------------

def test_a_short_text_is_one_chunk(tokenizer) -> None:
    assert list(Chunker(tokenizer, 16, 4).windows(words(5))) == [(5, {"text": words(5)})]


def test_windows_overlap_and_cover_every_token(tokenizer) -> None:
    chunks = list(Chunker(tokenizer, 10, 3).windows(words(30)))
    texts = [record["text"].split() for _, record in chunks]
    assert [len(t) for t in texts] == [10, 10, 10, 9]  # starts 0, 7, 14, 21 (the last runs to the end)
    assert [n for n, _ in chunks] == [10, 10, 10, 9]
    for before, after in zip(texts, texts[1:]):
        assert before[-3:] == after[:3]
    assert sorted({w for t in texts for w in t}) == sorted(words(30).split())


def test_no_chunk_holds_only_what_the_one_before_had(tokenizer) -> None:
    chunks = list(Chunker(tokenizer, 10, 3).windows(words(17)))  # windows 0-9, 7-16: nothing left over
    assert [len(record["text"].split()) for _, record in chunks] == [10, 10]


def test_no_overlap(tokenizer) -> None:
    chunks = list(Chunker(tokenizer, 4, 0).windows(words(8)))
    assert [record["text"] for _, record in chunks] == [words(4), words(4, 4)]


def test_chunks_keep_the_text_between_tokens(tokenizer) -> None:
    text = "Zorblat, the capital.\n\nIt opened in 2071!"
    assert list(Chunker(tokenizer, 64, 8).windows(text)) == [(10, {"text": text})]


def test_long_texts_are_tokenized_in_blocks_with_the_same_result(tokenizer, monkeypatch) -> None:
    text = "\n\n".join(words(40, start) for start in range(0, 400, 40))
    whole = list(Chunker(tokenizer, 16, 4).windows(text))
    monkeypatch.setattr(chunking, "BLOCK_CHARS", 100)
    assert list(Chunker(tokenizer, 16, 4).windows(text)) == whole


def test_instruction_records_are_one_chunk_each_with_their_tokens_counted(tokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}
    pair = {"prompt": "a b c", "completion": "d"}
    # chat: contents 3 + roles 2 + the template's markers around 2 messages; pair: 4 + its end of sequence
    assert Chunker(tokenizer, 4, 1).cut([chat, pair]) == ([(3 + 2 + 2 * MESSAGE_TOKENS, chat), (4 + 1, pair)],
                                                           15 + 5)
    text = {"text": words(30)}  # windows of 10 overlapping by 3: more tokens in chunks than in the text
    chunks, tokens = Chunker(tokenizer, 10, 3).cut([text])
    assert tokens == 30 and sum(count for count, _ in chunks) > 30


def test_overlap_must_be_below_the_chunk_size(tokenizer) -> None:
    with pytest.raises(ValueError, match="overlap"):
        Chunker(tokenizer, 8, 8)


def test_a_model_folder_without_a_fast_tokenizer_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)

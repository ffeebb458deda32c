"""The original corpus: find its files, stream their text, cut it into passages of N tokens.

Owns the formats a corpus may come in (folders of `.txt`/`.md`, `.jsonl` records with a text
field, `.parquet` files with a text column), the rule that packs paragraphs into passages, the
corpus fingerprint and the held-out rule (by passage hash, so it never changes between builds).
Files are streamed: no file is ever held whole in memory. Knows nothing of embeddings or indexes;
tokens are counted by a function it is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
MIN_PASSAGE_TOKENS = 8
# A paragraph longer than this is handed on in parts, so a file without blank lines still streams.
MAX_PARAGRAPH_CHARS = 20_000
PARQUET_BATCH_ROWS = 256

# The character spans (start, end) of the tokens of a text.
TokenSpans = Callable[[str], list[tuple[int, int]]]


class CorpusError(ValueError):
    """The configured corpus cannot be read; the message names the path."""


@dataclass(frozen=True)
class Passage:
    text: str
    tokens: int
    digest: str  # sha256 of the text: identity for deduplication and the held-out rule


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_held_out(passage_digest: str, fraction: float) -> bool:
    """True for the passages never trained on: a fixed `fraction` of them, chosen by hash."""
    return int(passage_digest[:16], 16) < fraction * 2**64


def source_files(paths: Iterable[Path]) -> list[Path]:
    """The corpus files under `paths` (files or folders), in a stable order."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise CorpusError(f"replay.corpus: {path} is not one of {', '.join(SUFFIXES)}")
            found[path] = None
        elif path.is_dir():
            for item in sorted(path.rglob("*")):
                if item.is_file() and item.suffix.lower() in SUFFIXES and not item.name.startswith("."):
                    found[item] = None
        else:
            raise CorpusError(f"replay.corpus: {path} does not exist")
    if not found:
        raise CorpusError(f"replay.corpus: no {', '.join(SUFFIXES)} files in {', '.join(map(str, paths))}")
    return list(found)


def file_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): what tells a changed file from an unchanged one."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def fingerprint(files: Iterable[Path], settings: dict[str, Any]) -> str:
    """Identity of a corpus as it will be cut: its files' stamps and the cutting settings."""
    stamps = [[str(path), *file_stamp(path)] for path in files]
    return hashlib.sha256(json.dumps([stamps, settings], sort_keys=True).encode()).hexdigest()


def passages(path: Path, text_field: str, spans: TokenSpans, passage_tokens: int) -> Iterator[Passage]:
    """Every passage of one corpus file, in a stable order (the build resumes by position)."""
    for document in documents(path, text_field):
        yield from pack(document, spans, passage_tokens)


def documents(path: Path, text_field: str) -> Iterator[Iterable[str]]:
    """The documents of a file, each as its paragraphs (a text file is one document)."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        yield _file_paragraphs(path)
    elif suffix == ".jsonl":
        yield from map(split_paragraphs, _jsonl_texts(path, text_field))
    elif suffix == ".parquet":
        yield from map(split_paragraphs, _parquet_texts(path, text_field))
    else:
        raise CorpusError(f"{path}: unsupported corpus file (use {', '.join(SUFFIXES)})")


def split_paragraphs(text: str) -> list[str]:
    return [part.strip() for part in text.split("\n\n") if part.strip()]


def pack(paragraphs: Iterable[str], spans: TokenSpans, passage_tokens: int) -> Iterator[Passage]:
    """Pack consecutive paragraphs into passages of at most `passage_tokens` tokens.

    A paragraph longer than that is cut at token boundaries. Passages shorter than
    MIN_PASSAGE_TOKENS (headings, stray lines) are dropped.
    """
    parts: list[str] = []
    used = 0
    for paragraph in paragraphs:
        for piece, count in _cut(paragraph, spans(paragraph), passage_tokens):
            if parts and used + count > passage_tokens:
                yield from _passage(parts, used)
                parts, used = [], 0
            parts.append(piece)
            used += count
    yield from _passage(parts, used)


def _cut(paragraph: str, offsets: list[tuple[int, int]], limit: int) -> Iterator[tuple[str, int]]:
    if len(offsets) <= limit:
        yield paragraph.strip(), len(offsets)
        return
    for start in range(0, len(offsets), limit):
        window = offsets[start:start + limit]
        yield paragraph[window[0][0]:window[-1][1]].strip(), len(window)


def _passage(parts: list[str], tokens: int) -> Iterator[Passage]:
    if parts and tokens >= MIN_PASSAGE_TOKENS:
        text = "\n\n".join(parts)
        yield Passage(text, tokens, digest(text))


def _file_paragraphs(path: Path) -> Iterator[str]:
    lines: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
                size += len(line)
            if (not line.strip() or size > MAX_PARAGRAPH_CHARS) and lines:
                yield "".join(lines).strip()
                lines, size = [], 0
    if lines:
        yield "".join(lines).strip()


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            text = record.get(text_field) if isinstance(record, dict) else None
            if isinstance(text, str):
                yield text
            else:
                skipped += 1
    if skipped:
        log.warning("%s: skipped %d lines that are not JSON objects with a text field %r", path, skipped, text_field)


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # deliberately lazy: only a parquet corpus needs it

    with pq.ParquetFile(path) as table:
        if text_field not in table.schema_arrow.names:
            raise CorpusError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); "
                              "set replay.text_field")
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))

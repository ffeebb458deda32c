"""Document readers: one function per file type, from a file's bytes to training records.

    records = get_reader(".pdf")(data)

Owns the formats (`.txt`, `.md`, `.html`, `.pdf`, `.jsonl`), which part of each is text, and the
reasons a person reads when a file is not what its name says (`Unreadable`). A record is
`{"text"}`, `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}` (the training
job's records, see `daemon.learning.jobs`): instruction data keeps its roles so training can choose to
learn only the answers. Knows nothing of normalisation, chunking, the journal or where files live.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Callable
from typing import Any

import html_text
from pypdf import PdfReader

Record = dict[str, Any]
Reader = Callable[[bytes], list[Record]]

READERS: dict[str, Reader] = {}
# More than this share of control characters (other than tab, newline, form feed) = not text.
MAX_CONTROL_SHARE = 0.01
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_RECORD_SHAPES = "a string 'text', strings 'prompt' and 'completion', or 'messages': a list of {'role', 'content'}"


class Unreadable(ValueError):
    """The file cannot be taken; `reason` says why, in words for a person."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnsupportedType(Unreadable):
    """No reader for this file name's extension."""


def register(*suffixes: str) -> Callable[[Reader], Reader]:
    """Register a reader for file names ending in `suffixes` (lower case, with the dot)."""
    def add(reader: Reader) -> Reader:
        for suffix in suffixes:
            if suffix in READERS:
                raise ValueError(f"a reader for {suffix} is registered already")
            READERS[suffix] = reader
        return reader

    return add


def supported() -> list[str]:
    return sorted(READERS)


def get_reader(suffix: str) -> Reader:
    """The reader for a file extension (".txt"); UnsupportedType lists the valid ones."""
    reader = READERS.get(suffix.lower())
    if reader is None:
        shown = f"'{suffix}'" if suffix else "no extension"
        raise UnsupportedType(f"unsupported type: {shown} (supported: {', '.join(supported())})")
    return reader


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without a byte-order mark) or UTF-16 with one; anything else is refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as error:
            raise Unreadable(f"undecodable: broken UTF-16 text at byte {error.start}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise Unreadable(f"binary: the file holds NUL bytes (the first at offset {nul}), so it is not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise Unreadable(f"undecodable: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                         "save it as UTF-8") from None
    if text and len(_CONTROL.findall(text)) > MAX_CONTROL_SHARE * len(text):
        raise Unreadable("binary: too many control characters for a text file")
    return text


@register(".txt", ".md", ".markdown")
def read_text(data: bytes) -> list[Record]:
    return [{"text": decode_text(data)}]


@register(".html", ".htm")
def read_html(data: bytes) -> list[Record]:
    """The visible text of a page: scripts, styles and markup dropped, blocks on lines of their own."""
    text = decode_text(data)
    try:
        return [{"text": html_text.extract_text(text, guess_layout=True)}]
    except ValueError as error:  # lxml refuses some inputs (e.g. an XML declaration in a str)
        raise Unreadable(f"unreadable HTML: {error}") from None


@register(".pdf")
def read_pdf(data: bytes) -> list[Record]:
    """The text of every page, pages apart by a blank line; a scan without a text layer is refused."""
    pages = _pdf_pages(data)
    text = "\n\n".join(page for page in pages if page.strip())
    if not text.strip():
        raise Unreadable(f"PDF without text: none of its {len(pages)} pages has a text layer "
                         "(a scan? run OCR on it first)")
    return [{"text": text}]


def _pdf_pages(data: bytes) -> list[str]:
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # damaged files log a line per object
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise Unreadable("encrypted PDF: it needs a password; save a copy without one")
            return [page.extract_text() or "" for page in reader.pages]
    except Unreadable:
        raise
    except Exception as error:  # pypdf raises many kinds of errors on damaged files
        raise Unreadable(f"unreadable PDF: {type(error).__name__}: {error}"[:500]) from None


@register(".jsonl")
def read_jsonl(data: bytes) -> list[Record]:
    """One record per non-blank line; the first bad line refuses the file, naming its number."""
    records = []
    for number, line in enumerate(decode_text(data).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            detail = f"{error.msg}, column {error.colno}" if isinstance(error, json.JSONDecodeError) else str(error)
            raise Unreadable(f"malformed JSONL: line {number} is not valid JSON ({detail})") from None
        records.append(_record(value, number))
    return records


def _record(value: Any, number: int) -> Record:
    """The training record in a JSONL line, keeping only the fields training reads."""
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return {"text": value["text"]}
        if isinstance(value.get("prompt"), str) and isinstance(value.get("completion"), str):
            return {"prompt": value["prompt"], "completion": value["completion"]}
        messages = value.get("messages")
        if isinstance(messages, list) and messages and all(_is_message(m) for m in messages):
            return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    raise Unreadable(f"malformed JSONL: line {number} is not a record: it needs {_RECORD_SHAPES}")


def _is_message(message: Any) -> bool:
    return (isinstance(message, dict) and isinstance(message.get("role"), str) and message["role"].strip() != ""
            and isinstance(message.get("content"), str))

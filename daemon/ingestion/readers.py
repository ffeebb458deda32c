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
import multiprocessing
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import html_text
from pypdf import PdfReader

Record = dict[str, Any]
CHARS_PER_TOKEN = 4  # while reading, text is bounded by characters: about this many per token


@dataclass(frozen=True)
class ReadLimits:
    """How much a reader may extract from one file (ingest.max_document_tokens, max_pdf_pages,
    extract_timeout_s): a small file must not become millions of tokens or minutes of CPU."""

    max_tokens: int = 10**9
    max_pdf_pages: int = 10**9
    timeout_s: float = 3600.0

    @property
    def max_chars(self) -> int:
        return self.max_tokens * CHARS_PER_TOKEN

    def check_text(self, chars: int) -> None:
        if chars > self.max_chars:
            raise Unreadable(f"too long: about {chars // CHARS_PER_TOKEN:,} tokens of text is over "
                             f"ingest.max_document_tokens = {self.max_tokens:,}")

    def check_tokens(self, tokens: int) -> None:
        """The bound on what the trainer will see, counted with the base model's tokenizer."""
        if tokens > self.max_tokens:
            raise Unreadable(too_many_tokens(tokens, self.max_tokens))


def too_many_tokens(tokens: int, max_tokens: int) -> str:
    return (f"too long: {tokens:,} tokens (counted by the base model's tokenizer, as training will see them) is over "
            f"ingest.max_document_tokens = {max_tokens:,}")


NO_LIMITS = ReadLimits()
Reader = Callable[[bytes, ReadLimits], list[Record]]

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
def read_text(data: bytes, limits: ReadLimits = NO_LIMITS) -> list[Record]:
    return [{"text": decode_text(data)}]


@register(".html", ".htm")
def read_html(data: bytes, limits: ReadLimits = NO_LIMITS) -> list[Record]:
    """The visible text of a page: scripts, styles and markup dropped, blocks on lines of their own."""
    text = decode_text(data)
    try:
        return [{"text": html_text.extract_text(text, guess_layout=True)}]
    except ValueError as error:  # lxml refuses some inputs (e.g. an XML declaration in a str)
        raise Unreadable(f"unreadable HTML: {error}") from None


@register(".pdf")
def read_pdf(data: bytes, limits: ReadLimits = NO_LIMITS) -> list[Record]:
    """The text of every page, pages apart by a blank line; a scan without a text layer is refused.

    Extraction runs in a child process killed after `limits.timeout_s`, and stops at
    `limits.max_pdf_pages` pages or `limits.max_chars` characters: a small PDF can repeat one
    content stream on every page, or hold one that takes minutes to parse."""
    pages = _in_worker(_pdf_pages, data, limits)
    text = "\n\n".join(page for page in pages if page.strip())
    if not text.strip():
        raise Unreadable(f"PDF without text: none of its {len(pages)} pages has a text layer "
                         "(a scan? run OCR on it first)")
    return [{"text": text}]


def _pdf_pages(data: bytes, limits: ReadLimits) -> list[str]:
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # damaged files log a line per object
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise Unreadable("encrypted PDF: it needs a password; save a copy without one")
            if len(reader.pages) > limits.max_pdf_pages:
                raise Unreadable(f"too many pages: {len(reader.pages):,} is over ingest.max_pdf_pages = "
                                 f"{limits.max_pdf_pages:,}")
            pages, chars = [], 0
            for page in reader.pages:
                pages.append(page.extract_text() or "")
                chars += len(pages[-1])
                limits.check_text(chars)
            return pages
    except Unreadable:
        raise
    except Exception as error:  # pypdf raises many kinds of errors on damaged files
        raise Unreadable(f"unreadable PDF: {type(error).__name__}: {error}"[:500]) from None


def _in_worker(extract: Callable[[bytes, ReadLimits], list[str]], data: bytes, limits: ReadLimits) -> list[str]:
    """`extract(data, limits)` in a fresh child process (spawned: the daemon has threads),
    killed after `limits.timeout_s`. Its Unreadable comes back as one."""
    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    worker = context.Process(target=_work, args=(sending, extract, data, limits), daemon=True)
    worker.start()
    sending.close()
    try:
        if not receiving.poll(limits.timeout_s):
            raise Unreadable(f"took too long: text extraction did not finish in {limits.timeout_s:g} s "
                             "(ingest.extract_timeout_s)")
        kind, value = receiving.recv()
    except EOFError:
        raise Unreadable(f"text extraction crashed (exit code {worker.exitcode})") from None
    finally:
        worker.kill()
        worker.join(5)
        receiving.close()
    if kind == "unreadable":
        raise Unreadable(value)
    return value


def _work(sending: Any, extract: Callable[[bytes, ReadLimits], list[str]], data: bytes, limits: ReadLimits) -> None:
    try:
        sending.send(("pages", extract(data, limits)))
    except Unreadable as error:
        sending.send(("unreadable", error.reason))
    finally:
        sending.close()


@register(".jsonl")
def read_jsonl(data: bytes, limits: ReadLimits = NO_LIMITS) -> list[Record]:
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

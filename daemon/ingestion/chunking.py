"""Text preparation: normalise records, identify their content, cut them into training chunks.

Owns the normal form of a text (Unicode NFC, one kind of line break, no control characters, runs
of spaces collapsed, at most one blank line in a row), the content hash that makes the same text
one document, and the chunks: overlapping windows of `chunk_tokens` tokens of the base model's
tokenizer, cut at token boundaries. Instruction records (`prompt`/`completion`, chat `messages`)
are one chunk each, whole, so their roles stay intact. Knows nothing of files or the journal;
loads only the `tokenizers` library (never torch), from the model folder's `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

Record = dict[str, Any]

TOKENIZER_FILE = "tokenizer.json"
# Long texts are tokenized in blocks of about this many characters, cut at a paragraph or a
# space, so memory stays flat whatever the size of the document.
BLOCK_CHARS = 200_000
_LINE_BREAKS = str.maketrans({"\r": "\n", "\x0b": "\n", "\x0c": "\n", "\x85": "\n", "\u2028": "\n", "\u2029": "\n"})
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
# A run of spaces inside a line that is not already one plain space (single spaces are left
# alone: matching each of them would cost a string per word).
_INNER_SPACE = re.compile(r"(?<=\S)(?:[^\S\n]{2,}|[^\S\n ])")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC; every kind of line break to \\n; control characters out; trailing spaces out; runs of
    spaces inside a line to one (indentation kept); three or more line breaks to two; stripped."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").translate(_LINE_BREAKS))
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _INNER_SPACE.sub(" ", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def normalise_records(records: Iterable[Record]) -> list[Record]:
    """Every text field normalised; text records left empty are dropped."""
    result = []
    for record in records:
        if "text" in record:
            text = normalise(record["text"])
            if text:
                result.append({"text": text})
        elif "messages" in record:
            result.append({"messages": [{"role": m["role"].strip(), "content": normalise(m["content"])}
                                        for m in record["messages"]]})
        else:
            result.append({"prompt": normalise(record["prompt"]), "completion": normalise(record["completion"])})
    return result


def record_text(record: Record) -> str:
    """A record's words as one text (a chat's turns one after another)."""
    if "text" in record:
        return record["text"]
    if "prompt" in record:
        return f"{record['prompt']}\n{record['completion']}"
    return "\n".join(message["content"] for message in record.get("messages", []))


def content_hash(records: list[Record]) -> str:
    """Identity of a document's content: equal normalised records, equal hash."""
    canonical = json.dumps(records, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_tokenizer(model_dir: Path) -> Any:
    """The base model's fast tokenizer (a `tokenizers.Tokenizer`)."""
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {TOKENIZER_FILE}: documents cannot be chunked "
                                "(use a base model that ships a fast tokenizer)")
    return Tokenizer.from_file(str(path))


# The tokens a chat template puts around each message, beyond its role and content (an estimate).
MESSAGE_TOKENS = 5


class Chunker:
    """Cuts records into (tokens, record) chunks with a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Any, chunk_tokens: int, overlap_tokens: int):
        if not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError(f"overlap ({overlap_tokens}) must be below the chunk size ({chunk_tokens})")
        self.tokenizer = tokenizer
        self.size = chunk_tokens
        self.step = chunk_tokens - overlap_tokens

    def chunks(self, records: Iterable[Record]) -> list[tuple[int, Record]]:
        return self.cut(records)[0]

    def cut(self, records: Iterable[Record]) -> tuple[list[tuple[int, Record]], int]:
        """The chunks of a document's records, and how many tokens the document has (each counted
        once: a text's windows overlap by the chunk overlap)."""
        chunks: list[tuple[int, Record]] = []
        counted = [0]
        for record in records:
            if "text" in record:
                chunks += self.windows(record["text"], counted)
            else:
                chunks.append((self._count(record), record))
                counted[0] += chunks[-1][0]
        return chunks, counted[0]

    def windows(self, text: str, counted: list[int] | None = None) -> Iterator[tuple[int, Record]]:
        """Windows of `size` tokens, each starting `step` tokens after the one before; the last
        one may be shorter, and is left out when the window before already holds all of it. The
        text's tokens are added to `counted[0]`."""
        spans: list[tuple[int, int]] = []  # the tokens not yet passed by a window's start
        emitted = False
        for block in self._spans(text):
            if counted is not None:
                counted[0] += len(block)
            spans += block
            first = 0
            while len(spans) - first >= self.size:
                yield self.size, _text(text, spans[first], spans[first + self.size - 1])
                emitted, first = True, first + self.step
            del spans[:first]
        if len(spans) > (self.size - self.step if emitted else 0):
            yield len(spans), _text(text, spans[0], spans[-1])

    def _spans(self, text: str) -> Iterator[list[tuple[int, int]]]:
        """The character spans of the text's tokens, a block at a time."""
        for start, end in _blocks(text):
            offsets = self.tokenizer.encode(text[start:end], add_special_tokens=False).offsets
            yield [(start + first, start + last) for first, last in offsets if last > first]

    def _count(self, record: Record) -> int:
        """The tokens the trainer sees for an instruction record: its texts, and for chat its roles
        and the template's markers around each message (MESSAGE_TOKENS, an estimate: ChatML and
        Llama 3 put 3-5 around each), so a million empty messages or a role of megabytes count."""
        if "messages" in record:
            texts = [text for message in record["messages"] for text in (message["role"], message["content"])]
            markers = MESSAGE_TOKENS * len(record["messages"])
        else:
            texts, markers = [record["prompt"], record["completion"]], 1  # the completion's end-of-sequence
        return markers + sum(len(e.ids) for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False))


def _text(text: str, first: tuple[int, int], last: tuple[int, int]) -> Record:
    """The text from the first token of a window to its last."""
    return {"text": text[first[0]:last[1]].strip()}


def _blocks(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive blocks of at most BLOCK_CHARS, each ending before a paragraph
    break, a line break or a space (in that preference) when there is one in its second half."""
    start = 0
    while start < len(text):
        end = min(start + BLOCK_CHARS, len(text))
        if end < len(text):
            end = next((cut for sep in ("\n\n", "\n", " ")
                        if (cut := text.rfind(sep, start + BLOCK_CHARS // 2, end)) > start), end)
        yield start, end
        start = end

"""Handing a file in to the inbox: uploads (POST /api/documents) and `cld ingest` write there
atomically, under a safe free name, as a user would copy a file in.

Owns the rules for untrusted file names, the upload size limit, and where a file lands
(`free_path`, also used for processed/ and quarantine/). Knows nothing of what happens to the file
afterwards (`daemon.ingestion.ingest`) or of HTTP.
"""

from __future__ import annotations

import os
import re
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from daemon.ingestion.readers import get_reader
from daemon.layout import REASON_SUFFIX
from replay.durable import fsync_dir

COPY_BLOCK_BYTES = 1 << 20
MAX_NAME_BYTES = 200  # of a handed-in file's name, in UTF-8 (file systems allow 255)
MAX_SUFFIX_CHARS = 16  # a longer "suffix" is not a file type, just part of the name
_RESERVED_NAME_CHARS = frozenset('/\\:*?"<>|')


class HandInError(ValueError):
    """A file cannot be handed in to the inbox; the message says why."""


class TooLarge(HandInError):
    pass


@dataclass(frozen=True)
class HandedIn:
    name: str  # relative to the inbox
    bytes: int


@dataclass(frozen=True)
class Uploads:
    """Where uploaded documents go (POST /api/documents) and how large one may be."""

    inbox: Path
    max_bytes: int

    def hand_in(self, name: str, source: BinaryIO) -> HandedIn:
        return hand_in(self.inbox, name, source, self.max_bytes)

    def too_large(self) -> TooLarge:
        return _too_large(self.max_bytes)


def safe_name(name: str) -> str:
    """A plain file name from an untrusted one: its last path part, with control, format and
    reserved characters replaced, without leading dots or spaces, at most MAX_NAME_BYTES long
    (keeping its suffix). HandInError when nothing is left."""
    last = re.split(r"[\\/]", unicodedata.normalize("NFC", name or ""))[-1]
    cleaned = "".join(_safe_char(char) for char in last).lstrip(". ").strip()
    if not cleaned:
        raise HandInError(f"file name {name!r} has no usable name in it: send a name like 'notes.md'")
    if len(cleaned.encode()) > MAX_NAME_BYTES:
        suffix = Path(cleaned).suffix if len(Path(cleaned).suffix) <= MAX_SUFFIX_CHARS else ""
        stem = cleaned[: len(cleaned) - len(suffix)].encode()[: MAX_NAME_BYTES - len(suffix.encode())]
        cleaned = stem.decode(errors="ignore") + suffix
    return cleaned


def _safe_char(char: str) -> str:
    """`char`, or "_" for a path or shell-reserved character or any Unicode control, format
    (bidi overrides, zero-width), surrogate, private-use or unassigned code point."""
    return "_" if char in _RESERVED_NAME_CHARS or unicodedata.category(char).startswith("C") else char


def hand_in(inbox: Path, name: str, source: BinaryIO, max_bytes: int | None = None) -> HandedIn:
    """Copy `source` into the inbox as a free version of `safe_name(name)`, atomically: the
    watcher sees the whole file or nothing. Raises HandInError (or UnsupportedType) and
    TooLarge (over `max_bytes`) before anything appears in the inbox."""
    plain = safe_name(name)
    get_reader(Path(plain).suffix)
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{uuid.uuid4().hex}.part"  # a dotfile: the watcher leaves it alone
    try:
        size = _copy_limited(source, tmp, max_bytes)
        target = _link_free(tmp, inbox, plain)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(inbox)
    return HandedIn(target.relative_to(inbox).as_posix(), size)


def _copy_limited(source: BinaryIO, target: Path, max_bytes: int | None) -> int:
    size = 0
    with open(target, "wb") as out:
        while block := source.read(COPY_BLOCK_BYTES):
            size += len(block)
            if max_bytes is not None and size > max_bytes:
                raise _too_large(max_bytes)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return size


def _too_large(max_bytes: int) -> TooLarge:
    return TooLarge(f"over the upload limit of {max_bytes / 1e6:g} MB (ingest.max_file_mb)")


def _link_free(tmp: Path, inbox: Path, name: str) -> Path:
    """Give the written file a free name in the inbox (a hard link never replaces a file)."""
    while True:
        target = free_path(inbox, name)
        try:
            os.link(tmp, target)
            return target
        except FileExistsError:
            continue


def reason_path(path: Path) -> Path:
    return path.with_name(path.name + REASON_SUFFIX)


def free_path(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/<stem>.<n><suffix>` with the first n free (a file and its
    `.reason` both). Subfolders are kept unless a file is in the way; then they are flattened."""
    relative = Path(name)
    if any((folder / parent).exists() and not (folder / parent).is_dir() for parent in relative.parents):
        relative = Path(name.replace("/", "__"))
    path, number = folder / relative, 0
    while os.path.lexists(path) or os.path.lexists(reason_path(path)):
        number += 1
        path = path.with_name(f"{relative.stem}.{number}{relative.suffix}")
    return path

"""Durable files: atomic writes (write, fsync, rename), durable moves, folders published in one
rename, JSON reads that name a damaged file, and single-writer locks.

The one home of this discipline for both packages: `replay/` uses it for the buffer, `daemon/`
for every file of the state directory (it lives here because `replay/` never imports `daemon/`).
Knows nothing of what any file holds or where it lives.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

LOCK_RETRY_S = 0.5


class DamagedFile(ValueError):
    """A state file that exists but cannot be read as what it should be; the message names it."""


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it and rename it over `path`:
    readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    payload = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(payload))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_json(path: Path, default: Any = None, *, lenient: bool = False) -> Any:
    """The JSON in `path`, or `default` when the file is missing. A file that cannot be read or
    parsed raises DamagedFile naming it, or gives `default` too when `lenient` (for files that
    are rebuilt when damaged)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as error:
        if lenient:
            return default
        raise DamagedFile(f"{path} is damaged ({error})") from None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file in `folder` (recursively) and the folders themselves."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def publish_dir(staging: Path, final: Path) -> None:
    """Make a fully written `staging` folder appear at `final` in one rename.

    An existing `final` is moved aside first and removed after, so a crash leaves either the old
    or the new folder in place (plus, at worst, a leftover `.old` folder).
    """
    fsync_tree(staging)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def move_durably(source: Path, target: Path) -> None:
    """Move a file (or a symlink itself) to `target`, durable once this returns.

    A rename when both are on one file system; else copy to a hidden temporary name beside
    `target`, fsync, rename, then remove `source`. Either way, repeating the call after a crash
    finishes the move.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        _copy_across(source, target)
        source.unlink()
    fsync_dir(target.parent)
    fsync_dir(source.parent)


def _copy_across(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if source.is_symlink():
        tmp.unlink(missing_ok=True)
        os.symlink(os.readlink(source), tmp)
    else:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, target)


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: Callable[[], Exception], stop: threading.Event | None = None) -> Iterator[None]:
    """Hold the advisory lock on `path` (created if missing) while the block runs; the kernel
    drops it when the process dies. When another process holds it: raise `busy()` at once, or,
    with `stop`, wait until it is free or `stop` is set (then raise `busy()`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop is None or stop.wait(LOCK_RETRY_S):
                    raise busy() from None
        yield


def lock_held(path: Path) -> bool:
    """Whether some process holds the lock `exclusive_lock` takes on `path` (asked without waiting)."""
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:  # no lock file: nobody ever took it
        return False

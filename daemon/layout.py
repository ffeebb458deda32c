"""The state directory's layout and atomic file writes.

Owns every file and folder name under the state directory (one place, so tools, tests and docs
agree) and the write-fsync-rename discipline. Knows nothing of what the files mean.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_DIR = "model"
PREPARED_MARKER = "prepared.json"
INBOX_DIR = "inbox"
PROCESSED_DIR = "processed"
QUARANTINE_DIR = "quarantine"
ADAPTERS_DIR = "adapters"
REPLAY_DIR = "replay"
JOURNAL_FILE = "journal.sqlite3"
INGEST_LOCK_FILE = "ingest.lock"
REASON_SUFFIX = ".reason"  # quarantine/<name>.reason says why <name> is there
SERVING_FILE = "serving.json"
DAEMON_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"
VLLM_PID_FILE = "vllm.pid"
LOGS_DIR = "logs"
CYCLES_DIR = "cycles"
JOBS_DIR = "jobs"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def inbox(self) -> Path:
        return self.root / INBOX_DIR

    @property
    def processed(self) -> Path:
        return self.root / PROCESSED_DIR

    @property
    def quarantine(self) -> Path:
        return self.root / QUARANTINE_DIR

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL_FILE

    @property
    def ingest_lock(self) -> Path:
        return self.root / INGEST_LOCK_FILE

    @property
    def adapters(self) -> Path:
        return self.root / ADAPTERS_DIR

    @property
    def serving(self) -> Path:
        return self.root / SERVING_FILE

    @property
    def daemon(self) -> Path:
        return self.root / DAEMON_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def vllm_pid(self) -> Path:
        return self.root / VLLM_PID_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    def ensure(self) -> StateDir:
        for folder in (self.root, self.inbox, self.adapters, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


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

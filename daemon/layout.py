"""The state directory's layout.

Owns every file and folder name under the state directory (one place, so tools, tests and docs
agree). Knows nothing of what the files mean; how they are written durably is `replay.durable`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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
VLLM_KEY_FILE = "vllm.key"  # the key of the vLLM cld runs (mode 600; new at each start)
LOGS_DIR = "logs"
CYCLES_DIR = "cycles"
JOBS_DIR = "jobs"
TEACHER_DIR = "teacher"  # teacher/<document hash>.json: the questions and answers a teacher wrote about it
RECALL_DIR = "recall"  # recall/<document hash>.npz: a document's passages and vectors, for recall (daemon.recall)
FORMS_DIR = "forms"  # forms/<document hash>.json: what a document is trained as, kept for life (learning.forms)
VERSION_RE = re.compile(r"^v(\d{4,})$")  # adapters/<version>: v0001, v0002, ...
BASE_VERSION = "base"  # what rollback and the CLI call the base model


def is_version(name: str | None) -> bool:
    """Whether `name` is an adapter version name (never a path)."""
    return isinstance(name, str) and VERSION_RE.fullmatch(name) is not None


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
    def vllm_key(self) -> Path:
        return self.root / VLLM_KEY_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def teacher(self) -> Path:
        return self.root / TEACHER_DIR

    @property
    def forms(self) -> Path:
        return self.root / FORMS_DIR

    @property
    def recall(self) -> Path:
        return self.root / RECALL_DIR

    def ensure(self) -> StateDir:
        for folder in (self.root, self.inbox, self.adapters, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        return self

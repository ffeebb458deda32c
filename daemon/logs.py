"""Log output: plain text for people, JSON lines for log pipelines (`[log] format`).

Owns the handler and formats on stderr, and the fields every line made during a learning cycle
carries (`cycle`, `version`, `stage`), taken from the cycle running in the current task
(`current_cycle`), so the code that logs needs not pass them. Under systemd (stderr is the journal,
`$JOURNAL_STREAM`) the text format leaves the time out: journald adds its own. vLLM's own lines are
relayed as they are, as the message of logger `cld.vllm`. Knows nothing of what is logged.
"""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from daemon.config import LogSection

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)-7s %(name)s: %(message)s"
JSON_FIELDS = {"levelname": "level", "name": "logger"}
# One line per internal HTTP request, and the scheduler's bookkeeping every interval: shown at DEBUG only.
QUIET_LOGGERS = ("httpx", "apscheduler")

# The cycle record of the learning cycle running in this task (set by the cycle; None outside one).
current_cycle: ContextVar[Any] = ContextVar("cld_current_cycle", default=None)


class CycleFields(logging.Filter):
    """Adds `cycle`, `version` and `stage` of the cycle running in this task to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        cycle = current_cycle.get()
        if cycle is not None:
            record.cycle, record.version, record.stage = cycle.id, cycle.version, cycle.stage
        return True


def setup(settings: LogSection, stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger's records to `stream` (stderr) in the configured format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(settings.format, under_journald=journald_stream(handler.stream)))
    handler.addFilter(CycleFields())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    return handler


class OneLine(logging.Formatter):
    """The text format, one line per record: line breaks and other control characters in the
    message (a file name, a relayed line) are written escaped, so no value can forge a log line.
    A traceback still follows on its own lines, each indented by Python."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escaped(super().formatMessage(record))


CONTROL = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7f] if code != 0x09}
CONTROL.update({0x0a: "\\n", 0x0d: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\x85"})


def escaped(text: str) -> str:
    return text.translate(CONTROL)


def formatter(kind: str, under_journald: bool = False) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter("{levelname}{name}{message}", style="{", rename_fields=JSON_FIELDS,
                             timestamp="time", json_ensure_ascii=False)  # time: ISO 8601, UTC
    return OneLine(JOURNAL_FORMAT if under_journald else TEXT_FORMAT)


def journald_stream(stream: TextIO) -> bool:
    """Whether `stream` is systemd's journal: `$JOURNAL_STREAM` names its device and inode."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(expected) and expected == f"{info.st_dev}:{info.st_ino}"

"""Log output: text for people (no time of our own under journald), JSON lines on request with the
running cycle's id, version and stage; the `[log]` settings."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import logs
from daemon.config import ConfigError, LogSection, load_settings
from daemon.learning.records import CycleRecord


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back as it was (logs.setup replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_json_lines_carry_the_running_cycles_fields(root_logger: logging.Logger, tmp_path: Path) -> None:
    out = tmp_path / "log.jsonl"
    with open(out, "w") as stream:
        logs.setup(LogSection(format="json", level="DEBUG"), stream)
        logging.getLogger("daemon.service").info("cld is serving %s", "cld", extra={"url": "http://x"})
        record = CycleRecord(id=7, trigger="api", version="v0007")
        record.enter("train")

        async def log_in_a_task() -> None:
            logging.getLogger("daemon.learning.probes").warning("slow probe: %d s", 12)

        async def cycle() -> None:
            token = logs.current_cycle.set(record)
            try:
                # a task started inside the cycle carries its fields too
                await asyncio.create_task(log_in_a_task())
                record.enter("probe")
                logging.getLogger("cld.vllm").info('INFO 11-25 [api_server.py:1] "POST /v1/completions" 200')
            finally:
                logs.current_cycle.reset(token)

        asyncio.run(cycle())
        logging.getLogger("daemon.learning.cycle").debug("after the cycle")
    ours = [json.loads(line) for line in lines(out)]
    first, probe, vllm, after = [line for line in ours if line["logger"] != "asyncio"]
    assert first["message"] == "cld is serving cld" and first["level"] == "INFO"
    assert first["logger"] == "daemon.service" and first["url"] == "http://x" and "T" in first["time"]
    assert "cycle" not in first
    assert (probe["cycle"], probe["version"], probe["stage"], probe["level"]) == (7, "v0007", "train", "WARNING")
    assert probe["message"] == "slow probe: 12 s"
    assert vllm["stage"] == "probe" and vllm["message"].startswith('INFO 11-25 [api_server.py:1] "POST')
    assert "cycle" not in after and after["level"] == "DEBUG"


def test_text_lines_have_a_time_except_under_journald(root_logger: logging.Logger, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "log.txt"
    with open(out, "w") as stream:
        logs.setup(LogSection(), stream)
        logging.getLogger("daemon.front.app").info("hello")
        logging.getLogger("daemon.front.app").debug("not at INFO")
        logging.getLogger("httpx").info("one line per request")
        logging.getLogger("apscheduler.executors.default").info("Running job ...")
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        logs.setup(LogSection(), stream)
        logging.getLogger("daemon.front.app").info("to the journal")
    timed, journald = lines(out)
    assert timed.endswith("INFO    daemon.front.app: hello") and timed[:4].isdigit()
    assert journald == "INFO    daemon.front.app: to the journal"


def test_journal_stream_of_another_file_is_not_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # inherited from a parent, not our stderr
    with open(tmp_path / "x", "w") as stream:
        assert not logs.journald_stream(stream)


def test_log_settings_come_from_the_file_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[log]\nlevel = "warning"\n')
    monkeypatch.setenv("CLD_LOG__FORMAT", "json")
    settings = load_settings(config)
    assert (settings.log.format, settings.log.level) == ("json", "WARNING")
    monkeypatch.setenv("CLD_LOG__FORMAT", "xml")
    with pytest.raises(ConfigError, match="log.format"):
        load_settings(config)


def test_a_value_with_line_breaks_cannot_forge_a_log_line(root_logger: logging.Logger, tmp_path: Path) -> None:
    """A file named "notes\nERROR daemon.service: cld stopped.txt" in the inbox (the second
    adversarial test) is logged on one line; a traceback still follows on lines of its own."""
    out = tmp_path / "log.txt"
    name = "notes\nERROR   daemon.service: cld stopped\r\x1b[2J.txt"
    with open(out, "w") as stream:
        logs.setup(LogSection(), stream)
        logging.getLogger("daemon.ingestion.ingest").info("ingested %s: document", name)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("daemon.service").exception("failed on %s", name)
    first, second, *trace = lines(out)
    assert first.endswith(r"ingested notes\nERROR   daemon.service: cld stopped\r\x1b[2J.txt: document")
    assert "failed on notes\\n" in second and trace[0] == "Traceback (most recent call last):"
    assert trace[-1] == "ValueError: boom"


def test_internal_requests_and_the_scheduler_show_at_debug(root_logger: logging.Logger, tmp_path: Path) -> None:
    out = tmp_path / "log.txt"
    with open(out, "w") as stream:
        logs.setup(LogSection(level="DEBUG"), stream)
        logging.getLogger("httpx").info("one line per request")
        logging.getLogger("apscheduler.executors.default").info("Running job ...")
    assert [line.split(": ", 1)[1] for line in lines(out)] == ["one line per request", "Running job ..."]

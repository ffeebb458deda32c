"""cld under systemd: the unit verifies, and the sd_notify protocol is spoken over a real notify
socket, by the notifier alone and by the real `cld run` (READY=1 only once /health answers,
STATUS= lines, WATCHDOG=1 at the interval, STOPPING=1 on SIGTERM, exit code 0)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon import systemd
from daemon.learning.records import CycleRecord
from daemon.service import status_line
from tests.conftest import REPO, LiveDaemon, free_port, write_config

UNIT = REPO / "systemd" / "cld.service"


class Listener:
    """A notify socket like systemd's: an AF_UNIX datagram socket, each message timestamped."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def receive(self, until_s: float) -> list[tuple[float, str]]:
        """Messages that arrive within `until_s` seconds (all of them, and no waiting after)."""
        deadline = time.monotonic() + until_s
        got = []
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            got.append((time.monotonic(), data.decode()))
        self.messages += got
        return got

    def wait_for(self, field: str, timeout_s: float) -> float:
        """The time the first message with `field` ("READY=1") arrived, waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, text in self.messages:
                if field in text.split("\n"):
                    return at
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))
        raise AssertionError(f"no {field} within {timeout_s} s; got {[m for _, m in self.messages]}")

    def fields(self, prefix: str) -> list[str]:
        return [line for _, text in self.messages for line in text.split("\n") if line.startswith(prefix)]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    listening = Listener(str(tmp_path / "notify"))
    yield listening
    listening.close()


# ---- the notifier alone -------------------------------------------------------------------------

def test_the_notifier_speaks_sd_notify_to_a_socket_path(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "4000000", "OTHER": "kept"}
    notifier = systemd.notifier(env)
    assert isinstance(notifier, systemd.Notifier) and notifier.watchdog_interval_s == 2.0
    assert env == {"OTHER": "kept"}, "children (vLLM, the trainer) must not inherit the notify variables"
    notifier.status("preparing model")
    notifier.extend_timeout(30)
    notifier.ready("serving the base model")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()
    assert [text for _, text in listener.receive(0.5)] == [
        "STATUS=preparing model", "EXTEND_TIMEOUT_USEC=30000000", "READY=1\nSTATUS=serving the base model",
        "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping",
    ]


def test_the_notifier_reaches_an_abstract_socket() -> None:
    listening = Listener(f"@cld-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        notifier = systemd.notifier({"NOTIFY_SOCKET": listening.address})
        notifier.ready("up")
        notifier.close()
        assert [text for _, text in listening.receive(0.3)] == ["READY=1\nSTATUS=up"]
    finally:
        listening.close()


def test_without_a_notify_socket_the_notifier_does_nothing() -> None:
    notifier = systemd.notifier({"WATCHDOG_USEC": "1000000"})
    assert isinstance(notifier, systemd.NullNotifier) and notifier.watchdog_interval_s is None
    notifier.ready("x"), notifier.status("x"), notifier.watchdog(), notifier.stopping(), notifier.close()


def test_a_vanished_socket_never_stops_the_daemon(tmp_path: Path) -> None:
    notifier = systemd.notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    try:
        assert notifier.send("READY=1") is False
    finally:
        notifier.close()


@pytest.mark.parametrize("env, seconds", [
    ({"WATCHDOG_USEC": "60000000"}, 30.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, 30.0),  # 4242 = this process in the test
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_the_watchdog_interval_follows_sd_watchdog_enabled(env: dict[str, str], seconds: float | None) -> None:
    assert systemd.watchdog_interval_s(env, pid=4242) == seconds


async def test_status_changes_extensions_and_pings_are_sent_from_the_event_loop(listener: Listener) -> None:
    notifier = systemd.Notifier(listener.address, watchdog_interval_s=0.1)
    lines = iter(["starting vLLM", "starting vLLM", "serving v0001"])
    phase = {"line": "starting vLLM"}

    def line() -> str:
        phase["line"] = next(lines, phase["line"])
        return phase["line"]

    tasks = [asyncio.create_task(systemd.report_status(notifier, line, lambda: phase["line"] != "serving v0001",
                                                       tick_s=0.05)),
             asyncio.create_task(systemd.ping_watchdog(notifier))]
    await asyncio.sleep(0.55)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    notifier.close()
    received = listener.receive(0.2)
    texts = [text for _, text in received]
    assert [t for t in texts if t.startswith("STATUS=")] == ["STATUS=starting vLLM", "STATUS=serving v0001"]
    assert texts.count("EXTEND_TIMEOUT_USEC=30000000") == 2, "more start-up time is asked for only while starting"
    assert 3 <= texts.count("WATCHDOG=1") <= 7, "one ping per interval (0.55 s / 0.1 s; fewer on a loaded machine)"


@pytest.mark.parametrize("serving, stage, progress, line", [
    (None, None, {}, "serving the base model"),
    ("v0003", None, {}, "serving v0003"),
    ("v0003", "train", {"step": 30, "steps": 120}, "serving v0003; cycle 4: train step 30/120"),
    ("v0003", "train", {"step": 30, "steps": 120, "eta_s": 290.0},
     "serving v0003; cycle 4: train step 30/120, about 5 min left"),
    ("v0003", "train", {}, "serving v0003; cycle 4: train"),
    (None, "probe", {"step": 120, "steps": 120}, "serving the base model; cycle 4: probe"),
])
def test_the_status_line_says_what_serves_and_what_the_cycle_does(serving: str | None, stage: str | None,
                                                                   progress: dict, line: str) -> None:
    cycle = CycleRecord(id=4, trigger="api", stage=stage, progress=progress) if stage else None
    assert status_line(serving, cycle) == line


# ---- the unit -------------------------------------------------------------------------------------

def verify(unit_text: str, folder: Path) -> tuple[int, str]:
    """`systemd-analyze verify` on `unit_text` with ExecStart pointing at this checkout's cld. It
    does not resolve User= (the `cld` user need not exist here); it checks every directive and
    value, and that ExecStart is executable. Warnings leave the exit code 0, so they count too."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: `make test` installs Debian's systemd"
    unit = folder / "cld.service"
    unit.write_text(unit_text.replace("/opt/cld/.venv/bin/cld", str(REPO / ".venv" / "bin" / "cld")))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    about_unit = [line for line in done.stderr.splitlines() if unit.name in line]
    return done.returncode, "\n".join(about_unit)


def test_the_unit_verifies(tmp_path: Path) -> None:
    code, complaints = verify(UNIT.read_text(), tmp_path)
    assert (code, complaints) == (0, "")


@pytest.mark.parametrize("old, new, words", [
    ("Type=notify", "Type=notifyy", "Failed to parse service type"),
    ("WatchdogSec=60", "WatchdogSecs=60", "Unknown key 'WatchdogSecs'"),
    ("ProtectSystem=strict", "ProtectSystem=very", "Failed to parse protect system value"),
    ("/opt/cld/.venv/bin/cld run", "/opt/cld/.venv/bin/no-such-cld run", "no-such-cld is not executable"),
])
def test_a_broken_unit_fails_verification(tmp_path: Path, old: str, new: str, words: str) -> None:
    text = UNIT.read_text()
    assert old in text
    _, complaints = verify(text.replace(old, new), tmp_path)
    assert words in complaints


def test_the_unit_runs_cld_as_a_notify_service_with_a_watchdog_and_a_long_enough_stop() -> None:
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure" and settings["User"] == "cld" and settings["StateDirectory"] == "cld"
    assert int(settings["WatchdogSec"]) >= 30
    from daemon import service
    from daemon.engine.supervisor import Supervisor
    from daemon.ingestion import watch
    from daemon.learning import cycle, replay_plan

    vllm_stop_s = Supervisor.__init__.__kwdefaults__["stop_timeout_s"]  # type: ignore[index]
    learner_s = cycle.PROMOTE_FINISH_TIMEOUT_S + cycle.TRAINER_STOP_TIMEOUT_S + cycle.CANCEL_TIMEOUT_S
    total_s = (watch.STOP_TIMEOUT_S + service.RECALL_STOP_TIMEOUT_S + service.FRONT_STOP_TIMEOUT_S + learner_s
               + replay_plan.STOP_TIMEOUT_S + vllm_stop_s)
    assert int(settings["TimeoutStopSec"]) > total_s
    assert "MemoryDenyWriteExecute=" not in "\n".join(settings), "it breaks the JITs of torch and oneDNN"


# ---- the real daemon ------------------------------------------------------------------------------

@pytest.mark.integration
def test_cld_run_notifies_systemd(live_daemon: LiveDaemon, tmp_path: Path, listener: Listener) -> None:
    """A second daemon on the shared vLLM (external mode), started as systemd would start it."""
    port = free_port()
    config = write_config(tmp_path, port)
    config.write_text(config.read_text().replace("[serve]\n", f'[serve]\nvllm_url = "{live_daemon.vllm_url}"\n', 1))
    env = {**os.environ, "NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "2000000",
           "CLD_SERVE__VLLM_API_KEY": live_daemon.vllm_key}
    with open(tmp_path / "daemon.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        ready_at = listener.wait_for("READY=1", timeout_s=120)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200, \
            "READY=1 came before /health answered"
        listener.receive(3.5)
        process.send_signal(signal.SIGTERM)
        stopping_at = listener.wait_for("STOPPING=1", timeout_s=10)
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log_text = (tmp_path / "daemon.log").read_text(errors="replace")
    assert code == 0, log_text[-3000:]
    statuses = listener.fields("STATUS=")
    assert statuses[0] == "STATUS=starting vLLM" and "STATUS=serving the base model" in statuses, statuses
    assert statuses[-1] == "STATUS=stopping"
    pings = [at for at, text in listener.messages if text == "WATCHDOG=1" and ready_at <= at <= stopping_at]
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    # WATCHDOG_USEC/2 = 1 s apart; always well within the 2 s watchdog period, even on a loaded machine.
    assert len(pings) >= 3 and all(0.7 <= gap <= 1.9 for gap in gaps), gaps

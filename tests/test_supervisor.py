"""The process supervisor: ready detection, restart with backoff, clean stop without orphans."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from daemon.engine.supervisor import State, Supervisor, backoff_delay, kill_stale_group
from tests.conftest import free_port

CHILD = Path(__file__).parent / "fakes" / "child_server.py"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def pids(path: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]  # type: ignore[misc]


def make(tmp_path: Path, *extra: str, **kwargs) -> tuple[Supervisor, Path]:
    port = free_port()
    pids_file = tmp_path / "pids"
    pids_file.touch()

    async def healthy() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"http://127.0.0.1:{port}/health", timeout=1)).status_code == 200
        except httpx.HTTPError:
            return False

    argv = [sys.executable, str(CHILD), str(port), str(pids_file), *extra]
    options = {"poll_s": 0.05, "backoff_s": (0.1, 0.4), "stop_timeout_s": 5, **kwargs}
    return Supervisor("child", argv, dict(os.environ), healthy, **options), pids_file


async def test_becomes_ready_relays_logs_and_stops_the_whole_group(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    supervisor, pids_file = make(tmp_path, "--ready-after", "0.3", pid_file=tmp_path / "child.pid")
    supervisor.start()
    await supervisor.wait_ready(20)
    assert supervisor.state is State.READY
    assert (tmp_path / "child.pid").is_file()
    [(child, grandchild)] = pids(pids_file)
    assert alive(child) and alive(grandchild)
    await supervisor.stop()
    assert supervisor.state is State.STOPPED
    assert wait_dead(child) and wait_dead(grandchild), "stop() left a process behind"
    assert not (tmp_path / "child.pid").exists()
    assert any("child listening on" in record.getMessage() for record in caplog.records)


async def test_restarts_after_a_crash_and_runs_the_ready_hook_each_time(tmp_path: Path) -> None:
    readies: list[float] = []

    async def on_ready() -> None:
        readies.append(time.monotonic())

    supervisor, pids_file = make(tmp_path, on_ready=on_ready)
    supervisor.start()
    await supervisor.wait_ready(20)
    [(first, first_grandchild)] = pids(pids_file)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while len(readies) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(readies) == 2 and supervisor.restarts == 1
    assert wait_dead(first_grandchild), "the crashed child's group was not cleaned up"
    second, second_grandchild = pids(pids_file)[-1]
    assert second != first
    await supervisor.stop()
    assert wait_dead(second) and wait_dead(second_grandchild)


@pytest.mark.parametrize(("failures", "delay"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)])
def test_backoff_doubles_up_to_its_cap(failures: int, delay: float) -> None:
    assert backoff_delay(failures, 1.0, 60.0) == delay


async def test_a_child_that_keeps_crashing_is_restarted_with_growing_waits(tmp_path: Path) -> None:
    supervisor, pids_file = make(tmp_path, "--exit-after", "0", backoff_s=(0.2, 0.8))
    supervisor.start()
    deadline = time.monotonic() + 60
    while len(pids(pids_file)) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await supervisor.stop()
    assert len(pids(pids_file)) >= 3 and supervisor.restarts >= 2
    assert supervisor.state is State.STOPPED


async def test_wait_ready_times_out_when_never_healthy(tmp_path: Path) -> None:
    supervisor, _ = make(tmp_path, "--ready-after", "60")
    supervisor.start()
    with pytest.raises(asyncio.TimeoutError):
        await supervisor.wait_ready(0.5)
    assert supervisor.state is State.STARTING
    await supervisor.stop()


async def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n")

    async def never() -> bool:
        return False

    supervisor = Supervisor("stubborn", [sys.executable, str(script)], dict(os.environ), never, stop_timeout_s=0.5)
    supervisor.start()
    await asyncio.sleep(0.5)
    pid = supervisor.pid
    assert pid is not None and alive(pid)
    started = time.monotonic()
    await supervisor.stop()
    assert wait_dead(pid)
    assert time.monotonic() - started < 20


def test_a_group_left_by_an_earlier_run_is_killed(tmp_path: Path) -> None:
    import subprocess

    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    stat = Path(f"/proc/{orphan.pid}/stat").read_text().rsplit(")", 1)[1].split()
    pid_file = tmp_path / "vllm.pid"
    pid_file.write_text(f"{orphan.pid} {stat[19]}\n")
    kill_stale_group(pid_file)
    assert orphan.wait(5) == -signal.SIGKILL
    assert not pid_file.exists()


def test_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    import subprocess

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    pid_file = tmp_path / "vllm.pid"
    pid_file.write_text(f"{bystander.pid} 1\n")  # same pid, different start time
    kill_stale_group(pid_file)
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()


async def test_stop_asks_politely_first(tmp_path: Path) -> None:
    script = tmp_path / "polite.py"
    marker = tmp_path / "got-sigterm"
    script.write_text(
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(marker)!r}).touch(), sys.exit(0)))\n"
        "time.sleep(600)\n"
    )

    async def never() -> bool:
        return False

    supervisor = Supervisor("polite", [sys.executable, str(script)], dict(os.environ), never, stop_timeout_s=5)
    supervisor.start()
    await asyncio.sleep(0.5)
    await supervisor.stop()
    assert marker.exists(), "the child was killed without a SIGTERM first"


def test_killing_the_supervising_process_takes_the_child_group_down(tmp_path: Path) -> None:
    import subprocess
    import textwrap

    port, pids_file = free_port(), tmp_path / "pids"
    pids_file.touch()
    script = tmp_path / "supervising.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, os, sys
        from daemon.engine.supervisor import Supervisor

        async def healthy():
            return True

        async def main():
            argv = [sys.executable, {str(CHILD)!r}, "{port}", {str(pids_file)!r}]
            Supervisor("child", argv, dict(os.environ), healthy).start()
            await asyncio.sleep(600)

        asyncio.run(main())
    """))
    daemon = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 90  # three interpreters start; slow on a loaded 2-core machine
    while not pids_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    [(child, grandchild)] = pids(pids_file)
    daemon.kill()  # kill -9: no chance to clean up
    daemon.wait()
    assert wait_dead(child, 30) and wait_dead(grandchild, 30), "kill -9 of the supervisor orphaned its child"


async def test_a_hung_child_is_killed_and_restarted(tmp_path: Path, caplog) -> None:
    """SIGSTOP: the port still accepts connections but nothing answers (as a hung vLLM)."""
    caplog.set_level(logging.INFO)
    readies = 0

    async def on_ready() -> None:
        nonlocal readies
        readies += 1

    supervisor, pids_file = make(tmp_path, health_every_s=0.2, unhealthy_restarts_after=3, on_ready=on_ready)
    supervisor.start()
    await supervisor.wait_ready(20)
    [(child, _)] = pids(pids_file)
    os.kill(child, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while readies < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    try:
        assert readies == 2 and supervisor.restarts == 1 and supervisor.state is State.READY
        assert wait_dead(child), "the hung child was left running"
        assert any("stopped answering: killing it" in r.getMessage() for r in caplog.records)
    finally:
        await supervisor.stop()


async def test_one_slow_answer_does_not_restart(tmp_path: Path) -> None:
    supervisor, pids_file = make(tmp_path, health_every_s=0.2, unhealthy_restarts_after=3)
    supervisor.start()
    await supervisor.wait_ready(20)
    [(child, _)] = pids(pids_file)
    os.kill(child, signal.SIGSTOP)
    await asyncio.sleep(0.5)  # one or two failed checks (each times out after 1 s in `make`'s check)
    os.kill(child, signal.SIGCONT)
    await asyncio.sleep(3)
    try:
        assert supervisor.restarts == 0 and alive(child)
    finally:
        await supervisor.stop()

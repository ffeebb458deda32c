"""Keep one child process (the vLLM server) running: start, watch, restart with backoff, stop.

Owns the child's process group, its log lines (relayed into ours) and its lifecycle state. The
child runs in a session of its own so that stopping it also stops everything it spawned (vLLM's
engine core and workers), under `daemon.engine.reaper`, which kills that group if the daemon dies, so
even a `kill -9` of the daemon leaves no orphan behind. Knows nothing of what the child serves: readiness is a
callable given by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[bool]]
ReadyHook = Callable[[], Awaitable[None]]


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"  # died; waiting before the next start


class Supervisor:
    """Runs `argv` until `stop()`; restarts it when it exits, waiting longer after each crash."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        healthy: HealthCheck,
        *,
        on_ready: ReadyHook | None = None,
        pid_file: Path | None = None,
        socket: Path | None = None,
        poll_s: float = 0.5,
        backoff_s: tuple[float, float] = (1.0, 60.0),
        stable_s: float = 120.0,
        stop_timeout_s: float = 30.0,
        health_every_s: float = 10.0,
        unhealthy_restarts_after: int = 3,
    ):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.healthy = healthy
        self.on_ready = on_ready
        self.pid_file = pid_file
        self.socket = socket  # the UNIX socket the child listens on: a dead one's file is removed before a start
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.stable_s = stable_s
        self.stop_timeout_s = stop_timeout_s
        self.health_every_s = health_every_s  # once ready, the health check runs this often
        self.unhealthy_restarts_after = unhealthy_restarts_after  # failed checks in a row before a restart
        self.state = State.STOPPED
        self.restarts = 0
        self.failures = 0  # exits in a row, each within stable_s of its start
        self.process: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        """Start the child and keep it running in the background."""
        if self._task is None:
            kill_stale_group(self.pid_file)
            self._task = asyncio.create_task(self._keep_running(), name=f"supervise-{self.name}")

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the child answers its health check; TimeoutError after `timeout_s`."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def stop(self) -> None:
        """Stop the child and everything it spawned: SIGTERM, then SIGKILL after the timeout."""
        self._stopping.set()
        await self._terminate()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._terminate()  # in case a start was under way
        self.state = State.STOPPED

    async def _keep_running(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            code = await self._run_once()
            if self._stopping.is_set():
                return
            self.failures = 0 if time.monotonic() - started > self.stable_s else self.failures + 1
            delay = backoff_delay(self.failures, *self.backoff_s)
            log.error("%s exited with code %s; restarting in %.0f s", self.name, code, delay)
            self.state = State.BACKOFF
            self.restarts += 1
            await asyncio.sleep(delay)

    async def _run_once(self) -> int:
        self.state = State.STARTING
        self._ready.clear()
        if self.socket is not None:  # left by a child that died: binding it again would fail
            self.socket.unlink(missing_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.engine.reaper", "--", *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        if self.pid_file is not None:
            self.pid_file.write_text(f"{self.process.pid} {_start_time(self.process.pid)}\n")
        log.info("started %s (pid %d)", self.name, self.process.pid)
        relay = asyncio.create_task(self._relay_output(self.process))
        watch = asyncio.create_task(self._watch_health(self.process))
        try:
            # Not process.wait(): it also waits for the output pipe, which the leader's children
            # (vLLM's engine core) may hold open after the leader died.
            while self.process.returncode is None:
                await asyncio.sleep(self.poll_s)
            return self.process.returncode
        finally:
            _kill_group(self.process.pid, signal.SIGKILL)  # what the leader spawned dies with it
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await asyncio.wait([relay], timeout=1)
            relay.cancel()
            self._ready.clear()

    async def _watch_health(self, process: asyncio.subprocess.Process) -> None:
        while process.returncode is None and not await self.healthy():
            await asyncio.sleep(self.poll_s)
        if process.returncode is not None:
            return
        log.info("%s is ready", self.name)
        if self.on_ready is not None:
            try:
                await self.on_ready()
            except Exception:
                log.exception("%s: the ready hook failed", self.name)
        self.state = State.READY
        self._ready.set()
        await self._keep_checking(process)

    async def _keep_checking(self, process: asyncio.subprocess.Process) -> None:
        """A child that stops answering (hung, stopped, deadlocked) is killed, so that it restarts."""
        failures = 0
        while process.returncode is None:
            await asyncio.sleep(self.health_every_s)
            failures = 0 if await self.healthy() else failures + 1
            if failures and process.returncode is None:
                log.warning("%s did not answer its health check (%d of %d before a restart)", self.name, failures,
                            self.unhealthy_restarts_after)
            if failures >= self.unhealthy_restarts_after:
                log.error("%s stopped answering: killing it to restart it", self.name)
                self.state = State.STARTING
                self._ready.clear()
                _kill_group(process.pid, signal.SIGKILL)
                return

    async def _relay_output(self, process: asyncio.subprocess.Process) -> None:
        child_log = logging.getLogger(f"cld.{self.name}")
        assert process.stdout is not None
        while line := await process.stdout.readline():
            child_log.info("%s", line.decode(errors="replace").rstrip())

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            _kill_group(process.pid if process else None, signal.SIGKILL)  # stragglers of a dead leader
            self._forget_pid()
            return
        log.info("stopping %s (pid %d)", self.name, process.pid)
        _kill_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s did not stop in %.0f s; killing it", self.name, self.stop_timeout_s)
            _kill_group(process.pid, signal.SIGKILL)
            await process.wait()
        _kill_group(process.pid, signal.SIGKILL)  # children that outlived their leader
        self._forget_pid()

    def _forget_pid(self) -> None:
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)


def backoff_delay(failures: int, first_s: float, most_s: float) -> float:
    """Seconds to wait before the next start after `failures` quick exits in a row: doubling
    from `first_s`, at most `most_s`."""
    return min(most_s, first_s * 2 ** max(failures - 1, 0))


def _kill_group(pgid: int | None, sig: int) -> None:
    if pgid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_stale_group(pid_file: Path | None) -> None:
    """Kill the process group a previous daemon left behind (recorded in `pid_file`).

    The file holds the leader's pid and start time, so a pid reused by an unrelated process is
    left alone.
    """
    if pid_file is None or not pid_file.is_file():
        return
    try:
        pgid, started = (int(part) for part in pid_file.read_text().split())
    except ValueError:
        pid_file.unlink(missing_ok=True)
        return
    leader_started = _start_time(pgid)
    ours = leader_started == started if leader_started is not None else _group_alive(pgid)
    if ours:
        log.warning("killing process group %d left behind by an earlier run", pgid)
        _kill_group(pgid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True

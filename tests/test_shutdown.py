"""A clean stop (SIGTERM): the daemon stops in the order that loses nothing, and a cycle caught
mid-training is cancelled with nothing half-written left and is journaled as cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from daemon.config import load_settings
from daemon.layout import CYCLES_DIR, StateDir
from daemon.learning.records import CycleStore
from daemon.service import Daemon
from tests.conftest import free_port
from tests.test_cycle import FACTS, FakeJournal, FakeVLLM, make, state, tiny  # noqa: F401 - fixtures

STOP_ORDER = ["watcher", "front", "schedule", "learner", "replay build", "vllm", "upstream", "journal"]


class Step:
    """Stands in for one part of the daemon and notes when it is stopped."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def stop(self) -> None:
        self.calls.append(self.name)

    close = stop


class AsyncStep(Step):
    async def stop(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0.01)
        self.calls.append(self.name)

    aclose = stop


class FakeServer:
    should_exit = False


async def test_shutdown_stops_documents_then_requests_then_learning_then_vllm_then_the_journal(
        tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "state"\n[serve]\nport = {free_port()}\nvllm_port = {free_port()}\n')
    settings = load_settings(config)
    daemon = Daemon(settings, StateDir(settings.state.dir).ensure())
    daemon.journal.close()
    calls: list[str] = []
    daemon.watcher, daemon.schedule, daemon.journal = (Step(n, calls) for n in ("watcher", "schedule", "journal"))
    daemon.learner, daemon.replay_build, daemon.supervisor, daemon.upstream = (
        AsyncStep(n, calls) for n in ("learner", "replay build", "vllm", "upstream"))
    daemon.state.daemon.write_text("{}")
    server = FakeServer()

    async def serve() -> None:
        while not server.should_exit:
            await asyncio.sleep(0.01)
        calls.append("front")

    await daemon._shut_down(server, asyncio.create_task(serve()))  # type: ignore[arg-type]
    assert calls == STOP_ORDER
    assert daemon.phase == "stopping" and not daemon.state.daemon.exists()


async def test_stopping_mid_training_cancels_the_cycle_and_leaves_nothing_half_written(state: StateDir,  # noqa: F811
                                                                                      tiny: Path) -> None:  # noqa: F811
    vllm, journal = FakeVLLM(), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    learner.settings.train.epochs = 10_000  # trains until stopped
    learner.request("api")
    record = await until(lambda: learner.current if learner.current and learner.current.progress.get("step") else None)
    trainer = learner.trainer
    assert trainer is not None and record.stage == "train"

    await asyncio.wait_for(learner.stop(), 60)
    assert trainer.returncode is not None, "the trainer is gone"
    saved = CycleStore(state.root / CYCLES_DIR).all()[-1]
    assert (saved.id, saved.state, saved.error) == (record.id, "failed", "cancelled: the daemon is stopping")
    assert list(state.adapters.iterdir()) == [], "no staging folder and no version folder"
    assert learner.router.current is None and vllm.loaded == {}, "serving is untouched"
    assert journal.docs[1]["state"] == "ready", "the documents wait for the next cycle"
    assert learner.task is not None and learner.task.done()


async def until(probe: Any, timeout_s: float = 120) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (found := probe()) is None:
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return found

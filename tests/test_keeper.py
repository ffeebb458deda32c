"""The daemon keeps what `cld` means loaded in vLLM, and says truthfully what serves: an adapter
that vanished from vLLM is loaded again; one that cannot be loaded (its folder deleted) leaves the
base serving, and serving.json, status and metrics say so. /health is 503 until the promoted
adapter is loaded after a (re)start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon import service
from daemon.config import load_settings
from daemon.engine.router import Adapter, Router
from daemon.engine.supervisor import State
from daemon.layout import StateDir
from daemon.observe import status
from daemon.service import Daemon
from tests.conftest import free_port


class FakeVLLM:
    """vLLM's adapter endpoints: what is loaded, and loads that fail for a missing folder."""

    def __init__(self) -> None:
        self.loaded: set[str] = {"cld-base"}
        self.loads = 0
        self.up = True

    async def served(self) -> set[str]:
        return set(self.loaded)

    async def load_lora(self, name: str, path: Path) -> None:
        self.loads += 1
        if not path.is_dir():
            raise RuntimeError(f"vLLM refused adapter {name} from {path}: not found")
        self.loaded.add(name)

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        return self.up


class FakeSupervisor:
    state = State.READY
    restarts = 0


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    monkeypatch.setattr(service, "KEEPER_EVERY_S", 0.01)
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "state"\n[serve]\nport = {free_port()}\nvllm_port = {free_port()}\n')
    settings = load_settings(config)
    made = Daemon(settings, StateDir(settings.state.dir).ensure())
    made.vllm = FakeVLLM()  # type: ignore[assignment]
    made.supervisor = FakeSupervisor()  # type: ignore[assignment]
    made.phase = "serving"
    folder = made.state.adapters / "v0001"
    folder.mkdir(parents=True)
    made.router.switch(Adapter("v0001", "cld-v0001-abc", folder))
    made.vllm.loaded.add("cld-v0001-abc")  # type: ignore[attr-defined]
    return made


async def keep_for(daemon: Daemon, seconds: float) -> None:
    keeper = asyncio.create_task(daemon._keep_adapter())
    await asyncio.sleep(seconds)
    keeper.cancel()


async def test_an_adapter_unloaded_behind_cld_is_loaded_again(daemon: Daemon) -> None:
    await keep_for(daemon, 0.05)
    assert daemon.vllm.loads == 0, "nothing to do while it is loaded"  # type: ignore[attr-defined]
    daemon.vllm.loaded.discard("cld-v0001-abc")  # type: ignore[attr-defined]  # a local user unloaded it
    await keep_for(daemon, 0.1)
    assert "cld-v0001-abc" in daemon.vllm.loaded and daemon.adapter_reloads == 1  # type: ignore[attr-defined]
    assert daemon.router.current is not None and daemon.router.current.version == "v0001"


async def test_an_adapter_whose_folder_is_gone_leaves_the_base_serving_and_says_so(daemon: Daemon) -> None:
    import shutil

    shutil.rmtree(daemon.state.adapters / "v0001")
    daemon.vllm.loaded.discard("cld-v0001-abc")  # type: ignore[attr-defined]  # e.g. vLLM restarted
    await keep_for(daemon, 0.1)
    assert daemon.router.current is None
    assert Router("cld", "cld-base", daemon.state.serving).current is None, "serving.json says the base"
    assert status.collect(daemon.settings)["model"]["current_adapter"] is None


async def test_health_is_503_until_the_model_server_is_ready_again(daemon: Daemon) -> None:
    assert await daemon._healthy()
    daemon.supervisor.state = State.STARTING  # type: ignore[union-attr]  # restarting: adapter not loaded yet
    assert not await daemon._healthy() and not daemon._ready()
    daemon.supervisor.state = State.READY  # type: ignore[union-attr]
    daemon.vllm.up = False  # type: ignore[attr-defined]
    assert not await daemon._healthy()


async def test_the_keeper_survives_a_check_that_fails(daemon: Daemon) -> None:
    calls = 0

    async def broken() -> set[str]:
        nonlocal calls
        calls += 1
        raise RuntimeError("unexpected")

    daemon.vllm.served = broken  # type: ignore[attr-defined,method-assign]
    await keep_for(daemon, 0.1)
    assert calls >= 2, "one failed check must not end the keeper"


def test_generation_limit_follows_the_context_length_unless_set(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[serve]\nmax_model_len = 8192\n")
    assert load_settings(config).serve.max_generated_tokens == 8192
    config.write_text("[serve]\nmax_model_len = 8192\nmax_tokens = 512\n")
    assert load_settings(config).serve.max_generated_tokens == 512

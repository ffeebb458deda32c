"""The daemon keeps what `cld` means loaded in vLLM, and says truthfully what serves: an adapter
that vanished from vLLM is loaded again; one that cannot be loaded (its folder deleted) leaves the
base serving, and serving.json, status and metrics say so. /health is 503 until the promoted
adapter is loaded after a (re)start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from daemon import service
from daemon.config import load_settings
from daemon.engine.merged import Instance
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


# ---- a served merged-weight version's own instance (issue 35 #2) ----------------------------------------------

class FakeInstanceSupervisor:
    def __init__(self) -> None:
        self.state, self.restarts, self.failures, self.stopped = State.READY, 0, 0, False

    async def stop(self) -> None:
        self.stopped = True


class FakeClient:
    base_url = "unix:/nowhere/vllm-1.sock"

    async def aclose(self) -> None:
        pass


def serve_merged(daemon: Daemon) -> Instance:
    """v0002, a merged-weight version, served by an instance of its own."""
    folder = daemon.state.adapters / "v0002"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    instance = Instance("cld-v0002-def", folder, 1, FakeInstanceSupervisor(), FakeClient())  # type: ignore[arg-type]
    assert daemon.merged is not None
    daemon.merged.instances[instance.served_name] = instance
    daemon.router.switch(Adapter("v0002", instance.served_name, folder))
    return instance


async def ahealth(daemon: Daemon) -> tuple[int, str]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=daemon._app()), base_url="http://f") as front:
        reply = await front.get("/health")
    return reply.status_code, reply.json().get("error", {}).get("message", reply.json().get("status"))


async def test_a_crashed_merged_instance_is_degraded_health_not_ok(daemon: Daemon) -> None:
    """It was ~50 s of 503 for every request under a /health of 200."""
    instance = serve_merged(daemon)
    assert await ahealth(daemon) == (200, "ok")
    instance.supervisor.state, instance.supervisor.restarts, instance.supervisor.failures = State.BACKOFF, 1, 1
    assert await ahealth(daemon) == (503, "degraded: the vLLM instance of v0002 is backoff (1 restarts)")
    assert daemon._status_line().startswith("degraded: the vLLM instance of v0002 is backoff")
    assert daemon._record()["degraded"] and b"cld_degraded 1.0" in daemon.metrics.expose()[0]
    assert "degraded: the vLLM instance of v0002 is backoff (1 restarts): requests to cld get 503" in status_text(daemon)
    await keep_for(daemon, 0.1)
    assert daemon.router.current is not None and daemon.router.current.version == "v0002", "it restarts: no fallback"
    instance.supervisor.state = State.READY
    assert await ahealth(daemon) == (200, "ok") and b"cld_degraded 0.0" in daemon.metrics.expose()[0]


@pytest.mark.parametrize("cause", ["folder deleted", "exits at every start"])
async def test_a_merged_version_that_cannot_be_restarted_falls_back_to_the_base(daemon: Daemon, cause: str) -> None:
    """It was 503 for as long as watched (150 s+) while /health, status and metrics said v0003 served."""
    import shutil

    instance = serve_merged(daemon)
    instance.supervisor.state, instance.supervisor.restarts = State.BACKOFF, 3
    if cause == "folder deleted":
        shutil.rmtree(instance.folder)
    else:
        instance.supervisor.failures = service.MERGED_FALLBACK_FAILURES
    await keep_for(daemon, 0.1)
    assert daemon.router.current is None and Router("cld", "cld-base", daemon.state.serving).current is None
    assert instance.supervisor.stopped and daemon.merged is not None and not daemon.merged.instances
    assert await ahealth(daemon) == (200, "ok"), "the base serves"
    record = daemon._record()
    assert record["fallback"]["version"] == "v0002" and record["degraded"] is None
    assert ("folder" in record["fallback"]["reason"]) == (cause == "folder deleted")
    assert b"cld_serving_fallbacks_total 1.0" in daemon.metrics.expose()[0]
    text = status_text(daemon)
    assert "v0002 could not be served" in text and "cld rollback v0002" in text


def status_text(daemon: Daemon) -> str:
    from rich.console import Console

    console = Console(record=True, width=240, color_system="standard", force_terminal=True)
    console.print(status.render(status.collect(daemon.settings, daemon=daemon._record())))
    return console.export_text(styles=False)

"""Merged-weight versions are served by vLLM instances of their own (daemon.engine.merged): the
command line, at most two instances on their own ports, stopped with all they spawned, the front
proxying a served name to its instance, and one client (Fleet) for every served name."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import httpx
import pytest

from daemon.config import ConfigError, Settings, load_settings
from daemon.engine import merged, vllm
from daemon.engine.merged import Fleet, MergedServers, is_merged
from daemon.engine.router import Router
from daemon.learning import adapters
from daemon.learning.records import CycleStore
from daemon.service import gpu_shares_problem
from tests.ingest_helpers import make_settings
from tests.test_supervisor import alive

CHILD = Path(__file__).parent / "fakes" / "child_server.py"


def settings_with(tmp_path: Path, **serve) -> Settings:
    made = make_settings(tmp_path)
    for key, value in serve.items():
        setattr(made.serve, key, value)
    return made


def test_a_merged_instance_serves_one_version_on_its_own_socket_without_lora(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    argv = vllm.server_command(tmp_path, settings, tmp_path / "vllm-1.sock", served_name="cld-v0007-abc123",
                               lora=False)
    assert argv[argv.index("--uds") + 1] == str(tmp_path / "vllm-1.sock") and "--port" not in argv
    assert argv[argv.index("--served-model-name") + 1] == "cld-v0007-abc123"
    assert "--enable-lora" not in argv and "--max-lora-rank" not in argv
    base = vllm.server_command(tmp_path, settings, tmp_path / "vllm.sock")
    assert "--enable-lora" in base and base[base.index("--served-model-name") + 1] == settings.serve.base_name


def test_a_merged_instance_starts_uncompiled_on_the_cpu_build_unless_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def merged_argv(cpu: bool, **serve) -> list[str]:
        monkeypatch.setattr(vllm, "is_cpu_build", lambda: cpu)
        return vllm.server_command(tmp_path, settings_with(tmp_path, **serve), tmp_path / "s.sock", served_name="cld-v1",
                                   lora=False)

    assert "--enforce-eager" in merged_argv(cpu=True)
    assert "--enforce-eager" not in merged_argv(cpu=True, merged_compile=True)
    assert "--enforce-eager" not in merged_argv(cpu=False)  # GPUs: CUDA graphs and compilation stay on
    monkeypatch.setattr(vllm, "is_cpu_build", lambda: True)
    assert "--enforce-eager" not in vllm.server_command(tmp_path, make_settings(tmp_path), tmp_path / "s.sock")  # LoRA: eager


def test_a_merged_version_is_a_complete_model_folder(tmp_path: Path) -> None:
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert is_merged(tmp_path / "model") and not is_merged(tmp_path / "lora") and not is_merged(tmp_path)


def test_merged_weights_need_an_instance_cld_starts(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[serve]\nvllm_url = "http://127.0.0.1:9"\n[train]\nmethod = "expand"\n')
    with pytest.raises(ConfigError, match="train.method = 'expand' trains merged weights.*serve.vllm_url"):
        load_settings(config)
    config.write_text('[train]\nmethod = "expand"\n')
    assert load_settings(config).train.method == "expand"


def test_the_default_method_is_expand_and_lora_with_an_external_vllm(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    assert load_settings(config).train.method == "expand"
    config.write_text('[serve]\nvllm_url = "http://127.0.0.1:9"\n')
    assert load_settings(config).train.method == "lora", "an external vLLM serves adapters only"
    config.write_text('[train]\nmethod = "lora"\n')
    assert load_settings(config).train.method == "lora"


def test_the_kv_cache_is_whole_gib_as_vllm_reads_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[serve]\nmerged_kv_cache_gib = 0.5\n")
    with pytest.raises(ConfigError, match="serve.merged_kv_cache_gib"):
        load_settings(config)
    config.write_text("[serve]\nkv_cache_gib = 2.0\nmerged_kv_cache_gib = 1\n")
    settings = load_settings(config)
    assert vllm.server_env(settings, "k", {}, merged=True).get("VLLM_CPU_KVCACHE_SPACE", "1") == "1"
    assert vllm.server_env(settings, "k", {}).get("VLLM_CPU_KVCACHE_SPACE", "2") == "2"


def test_the_gpu_must_hold_two_more_instances_for_merged_weights(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings.train.method, settings.serve.gpu_memory_utilization = "full", 0.6  # a share set in the config
    problem = gpu_shares_problem(settings, cpu=False)
    assert problem and "serve.merged_gpu_memory_utilization" in problem and "1.25" in problem
    assert "serve.gpu_memory_utilization = 0.35" in problem  # a split that fits: 0.35 + 2 × 0.15 + 0.35
    assert gpu_shares_problem(settings, cpu=True) is None
    settings.serve.gpu_memory_utilization = 0.3
    assert gpu_shares_problem(settings, cpu=False) is None
    settings.train.method = "lora"
    settings.serve.gpu_memory_utilization = 0.9
    assert gpu_shares_problem(settings, cpu=False) is None


def test_the_base_instance_makes_room_for_merged_weights_unless_its_share_is_set(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[train]\nmethod = "expand"\n')
    settings = load_settings(config)
    assert settings.serve.gpu_memory_utilization == 0.35 and gpu_shares_problem(settings, cpu=False) is None
    config.write_text('[train]\nmethod = "expand"\ngpu_memory_fraction = 0.2\n')
    assert load_settings(config).serve.gpu_memory_utilization == 0.5
    config.write_text('[serve]\ngpu_memory_utilization = 0.6\n[train]\nmethod = "expand"\n')
    assert "1.25" in gpu_shares_problem(load_settings(config), cpu=False)  # as asked: refused, with the sum
    config.write_text('[train]\nmethod = "lora"\n')
    assert load_settings(config).serve.gpu_memory_utilization == 0.6


class FakeClient:
    def __init__(self, name: str):
        self.name, self.calls = name, []

    async def token_nll(self, model: str, text: str) -> list[float]:
        self.calls.append(("token_nll", model))
        return [1.0]

    async def chat(self, model: str, messages: list, max_tokens: int) -> str:
        self.calls.append(("chat", model))
        return self.name

    async def complete(self, model: str, prompt: str, max_tokens: int) -> str:
        self.calls.append(("complete", model))
        return self.name

    async def unload_lora(self, name: str) -> None:
        self.calls.append(("unload_lora", name))

    async def served(self) -> set[str]:
        return {"cld-base", "cld-v0001-aaaaaa"}


class FakeInstance:
    def __init__(self, client: FakeClient):
        self.client = client


async def test_the_fleet_asks_each_served_name_of_the_instance_that_serves_it(tmp_path: Path) -> None:
    base, own = FakeClient("base"), FakeClient("merged")
    servers = MergedServers(make_settings(tmp_path), tmp_path, "key", {})
    servers.instances["cld-v0002-bbbbbb"] = FakeInstance(own)  # type: ignore[assignment]
    servers.endpoints["cld-v0002-bbbbbb"] = httpx.AsyncClient()
    fleet = Fleet(base, servers)  # type: ignore[arg-type]
    assert await fleet.chat("cld-v0002-bbbbbb", [], 4) == "merged"
    assert await fleet.complete("cld-v0001-aaaaaa", "x", 4) == "base"
    await fleet.token_nll("cld-base", "x")
    assert own.calls == [("chat", "cld-v0002-bbbbbb")]
    assert base.calls == [("complete", "cld-v0001-aaaaaa"), ("token_nll", "cld-base")]
    assert await fleet.served() == {"cld-base", "cld-v0001-aaaaaa", "cld-v0002-bbbbbb"}
    await fleet.unload_lora("cld-v0001-aaaaaa")
    assert base.calls[-1] == ("unload_lora", "cld-v0001-aaaaaa")
    await servers.endpoints["cld-v0002-bbbbbb"].aclose()


async def test_no_merged_weights_without_instances_of_our_own(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="need a vLLM instance cld starts itself"):
        await Fleet(FakeClient("base"), None).load_merged("cld-v0003-cccccc", tmp_path)  # type: ignore[arg-type]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Instances run the stand-in server (answers /health, spawns a grandchild) instead of vLLM."""
    pids = tmp_path / "pids"

    def command(folder: Path, settings: Settings, socket: Path, *, served_name: str, lora: bool) -> list[str]:
        assert not lora and served_name.startswith("cld-")
        return [sys.executable, str(CHILD), str(socket), str(pids)]

    monkeypatch.setattr(merged.vllm, "server_command", command)
    return pids


async def test_two_instances_at_most_each_on_its_socket_and_stopping_leaves_nothing(tmp_path: Path,
                                                                                    fake_vllm: Path) -> None:
    settings = settings_with(tmp_path, startup_timeout_s=30)
    router = Router("cld", "cld-base", tmp_path / "serving.json")
    servers = MergedServers(settings, tmp_path, "key", router.endpoints)
    first = await servers.start("cld-v0001-aaaaaa", tmp_path / "v0001")
    second = await servers.start("cld-v0002-bbbbbb", tmp_path / "v0002")
    assert {first.slot, second.slot} == {1, 2}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["vllm-1.sock", "vllm-2.sock"]
    assert set(router.endpoints) == {"cld-v0001-aaaaaa", "cld-v0002-bbbbbb"}
    assert await servers.start("cld-v0001-aaaaaa", tmp_path / "v0001") is first  # already running
    with pytest.raises(RuntimeError, match="2 merged-weight vLLM instances run already"):
        await servers.start("cld-v0003-cccccc", tmp_path / "v0003")
    assert [view["state"] for view in servers.views()] == ["ready", "ready"]
    pids = [int(p) for line in fake_vllm.read_text().splitlines() for p in line.split()]
    await servers.stop("cld-v0001-aaaaaa")
    assert set(router.endpoints) == {"cld-v0002-bbbbbb"}
    third = await servers.start("cld-v0003-cccccc", tmp_path / "v0003")
    assert third.slot == first.slot  # the freed slot is used again
    await servers.stop_all()
    assert servers.instances == {} and router.endpoints == {}
    pids += [int(p) for line in fake_vllm.read_text().splitlines()[2:] for p in line.split()]
    await asyncio.sleep(0.2)
    assert not any(alive(pid) for pid in pids), "an instance or what it spawned outlived its stop"
    assert not list(tmp_path.glob("vllm-*.pid")) and not list((tmp_path / "run").iterdir())


async def test_a_socket_left_by_a_dead_instance_does_not_stop_the_next_start(tmp_path: Path, fake_vllm: Path) -> None:
    servers = MergedServers(settings_with(tmp_path, startup_timeout_s=30), tmp_path, "key", {})
    stale = servers.socket(1)
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never unlinked: as a killed vLLM leaves it
        dead.bind(str(stale))
    first = await servers.start("cld-v0001-aaaaaa", tmp_path / "v0001")
    assert first.slot == 1 and (await first.client.healthy())
    await servers.stop_all()


async def test_an_instance_that_never_answers_is_stopped_and_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     fake_vllm: Path) -> None:
    settings = settings_with(tmp_path, startup_timeout_s=0.5)
    original = merged.vllm.server_command
    monkeypatch.setattr(merged.vllm, "server_command",
                        lambda *args, **kwargs: original(*args, **kwargs) + ["--ready-after", "60"])
    servers = MergedServers(settings, tmp_path, "key", {})
    with pytest.raises(RuntimeError, match="did not answer within 0 s"):
        await servers.start("cld-v0001-aaaaaa", tmp_path / "v0001")
    assert servers.instances == {}


async def test_an_instance_that_exits_before_it_is_ready_is_refused_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                            fake_vllm: Path) -> None:
    settings = settings_with(tmp_path, startup_timeout_s=300)
    original = merged.vllm.server_command
    monkeypatch.setattr(merged.vllm, "server_command",
                        lambda *args, **kwargs: original(*args, **kwargs) + ["--ready-after", "60", "--exit-after", "0.5"])
    servers = MergedServers(settings, tmp_path, "key", {})
    started = asyncio.get_running_loop().time()
    with pytest.raises(RuntimeError, match="exited before it was ready"):
        await servers.start("cld-v0001-aaaaaa", tmp_path / "v0001")
    assert asyncio.get_running_loop().time() - started < 60 and servers.instances == {}


# ---- retention: old merged versions lose their weights, not their history (state.keep_merged) ---------

def merged_version(adapters: Path, version: str) -> Path:
    folder = adapters / version
    (folder / "blocks").mkdir(parents=True)
    for name in ("config.json", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "blocks" / "extra.bin").write_bytes(b"\0" * 8)
    (folder / "meta.json").write_text(json.dumps({"method": "expand", "documents": [f"hash-{version}"]}))
    return folder


def test_old_merged_versions_lose_their_weights_and_keep_their_history(tmp_path: Path) -> None:
    adapters_dir = tmp_path / "adapters"
    for version in ("v0001", "v0002", "v0003", "v0004", "v0005", "v0006"):
        merged_version(adapters_dir, version)
    lora = adapters_dir / "v0007"
    lora.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "meta.json"):
        (lora / name).write_text("{}")
    promoted = ["v0001", "v0002", "v0004", "v0005", "v0006", "v0007"]  # v0003 was refused
    # v0002 serves (a rollback); the newest two promoted merged ones stay for rollback (the LoRA one does not count)
    assert adapters.prune_merged(adapters_dir, promoted, {"v0002"}, keep=2) == ["v0001", "v0003", "v0004"]
    for version in ("v0001", "v0003", "v0004"):
        folder = adapters_dir / version
        assert [p.name for p in folder.iterdir()] == ["meta.json"]
        meta = adapters.read_meta(folder)
        assert meta["documents"] == [f"hash-{version}"] and meta["method"] == "expand" and meta[adapters.PRUNED]
        with pytest.raises(adapters.AdapterError, match=f"{version}: its weights were deleted at .*state.keep_merged"):
            adapters.check_version(folder, 16)
    for version in ("v0002", "v0005", "v0006"):
        assert adapters.check_version(adapters_dir / version, 16) == {}
    assert sorted(p.name for p in lora.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "meta.json"]
    assert adapters.prune_merged(adapters_dir, promoted, {"v0002"}, keep=2) == [], "nothing twice"
    assert adapters.prune_merged(adapters_dir, [], set(), keep=0) == [], "0 keeps every version"
    view = {a["version"]: a["pruned_at"] for a in adapters.adapters_view(adapters_dir, CycleStore(tmp_path / "c"), None)}
    assert [v for v, pruned in view.items() if pruned] == ["v0001", "v0003", "v0004"]


def test_a_prune_cut_short_is_finished_by_the_next(tmp_path: Path) -> None:
    folder = merged_version(tmp_path, "v0001")
    (folder / "meta.json").write_text(json.dumps({"method": "expand", adapters.PRUNED: "2026-12-02T05:00:00Z"}))
    (folder / "tokenizer_config.json").unlink()  # the crash came after the mark and the first deletion
    assert is_merged(folder), "config.json goes last, so a folder cut short is still found"
    merged_version(tmp_path, "v0002")  # the newer version it was pruned for
    assert adapters.prune_merged(tmp_path, ["v0001", "v0002"], set(), keep=1) == ["v0001"]
    assert [p.name for p in folder.iterdir()] == ["meta.json"]
    assert adapters.read_meta(folder)[adapters.PRUNED] == "2026-12-02T05:00:00Z"

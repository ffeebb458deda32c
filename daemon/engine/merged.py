"""vLLM instances that serve merged-weight versions, beside the base instance.

A version trained with `train.method` mora, expand or full is a complete model folder, not a LoRA
the base instance can load, so it is served by a vLLM instance of its own under the name its cycle
gave it (such as `cld-v0007-3fa2c1`). At most two run (blue-green): the version `cld` serves and a
candidate being probed, each on a slot's UNIX socket (`run/vllm-1.sock`, `run/vllm-2.sock` beside
the base instance's). A candidate starts, is probed there, and on promotion the router points the
stable name at it; the old instance is stopped once its requests have drained
(`daemon.learning.cycle.Learner.swap`). `cld-base` stays on the base instance.

Owns those processes (a Supervisor each, so a crash restarts it), the HTTP clients that reach them
(registered in the router's `endpoints`, which the front proxies through) and `Fleet`: one client
for every served name, which the learning cycle and its probes use as they would one vLLM. Knows
nothing of which version is promoted or why.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from daemon.config import Settings
from daemon.engine import vllm
from daemon.engine.supervisor import Supervisor
from daemon.model import answer_stop

log = logging.getLogger(__name__)
SLOTS = 2  # the served version and one candidate
READY_POLL_S = 1.0


def is_merged(folder: Path) -> bool:
    """A complete model folder (merged weights), not a LoRA adapter."""
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


@dataclass
class Instance:
    served_name: str
    folder: Path
    slot: int
    supervisor: Supervisor
    client: vllm.VLLMClient

    def view(self) -> dict[str, Any]:
        return {"served_name": self.served_name, "version": self.folder.name, "slot": self.slot,
                "address": self.client.base_url, "state": self.supervisor.state.value,
                "restarts": self.supervisor.restarts}


class MergedServers:
    def __init__(self, settings: Settings, state_root: Path, key: str, endpoints: dict[str, httpx.AsyncClient]):
        self.settings, self.state_root, self.key = settings, state_root, key
        self.endpoints = endpoints  # the router's: served name -> the client the front proxies through
        self.instances: dict[str, Instance] = {}
        self._lock = asyncio.Lock()

    def socket(self, slot: int) -> Path:
        return vllm.sockets_dir(self.state_root) / f"vllm-{slot}.sock"

    async def start(self, served_name: str, folder: Path) -> Instance:
        """Start an instance serving `folder` as `served_name` and wait until it answers; the
        instance is stopped again if it does not (RuntimeError says why)."""
        async with self._lock:
            if served_name in self.instances:
                return self.instances[served_name]
            used = {instance.slot for instance in self.instances.values()}
            free = [slot for slot in range(1, SLOTS + 1) if slot not in used]
            if not free:
                running = ", ".join(sorted(self.instances))
                raise RuntimeError(f"{SLOTS} merged-weight vLLM instances run already ({running}): the served "
                                   "version and a candidate")
            slot, serve = free[0], self.settings.serve
            socket = self.socket(slot)
            http = vllm.async_client(vllm.socket_address(socket), httpx.Timeout(serve.request_timeout_s, connect=5),
                                     self.key, httpx.Limits(max_connections=256, max_keepalive_connections=64))
            client = vllm.VLLMClient(vllm.socket_address(socket), http, stop=answer_stop(folder))
            supervisor = Supervisor(
                f"vllm:{folder.name}",
                vllm.server_command(folder, self.settings, socket, served_name=served_name, lora=False),
                vllm.server_env(self.settings, self.key, merged=True), client.healthy,
                pid_file=self.state_root / f"vllm-{slot}.pid", socket=socket,
            )
            instance = Instance(served_name, folder, slot, supervisor, client)
            self.instances[served_name] = instance
        log.info("starting a vLLM instance for %s (%s) on slot %d", folder.name, served_name, slot)
        supervisor.start()
        try:
            await _ready(supervisor, serve.startup_timeout_s, folder.name)
        except BaseException:
            await self.stop(served_name)
            raise
        self.endpoints[served_name] = http
        log.info("%s is served by its own vLLM instance on slot %d", served_name, slot)
        return instance

    async def stop(self, served_name: str) -> None:
        """Stop the instance serving `served_name` (and everything it spawned)."""
        instance = self.instances.pop(served_name, None)
        self.endpoints.pop(served_name, None)
        if instance is None:
            return
        await instance.supervisor.stop()
        await instance.client.aclose()
        (self.state_root / f"vllm-{instance.slot}.pid").unlink(missing_ok=True)
        self.socket(instance.slot).unlink(missing_ok=True)
        log.info("stopped the vLLM instance of %s", served_name)

    async def stop_all(self) -> None:
        for served_name in list(self.instances):
            await self.stop(served_name)

    def views(self) -> list[dict[str, Any]]:
        return [instance.view() for instance in self.instances.values()]


async def _ready(supervisor: Supervisor, timeout_s: float, version: str) -> None:
    """Wait until the instance answers; RuntimeError when it exits first (a candidate that cannot
    start is refused now, not after serve.startup_timeout_s of restarts) or never answers."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if supervisor.restarts:
            raise RuntimeError(f"the vLLM instance for {version} exited before it was ready (its log is above)")
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise RuntimeError(f"the vLLM instance for {version} did not answer within {timeout_s:.0f} s "
                               "(serve.startup_timeout_s; its log is above)")
        try:
            await supervisor.wait_ready(min(left, READY_POLL_S))
            return
        except asyncio.TimeoutError:
            continue


class Fleet:
    """One vLLM client for every served name: a merged-weight version's own instance, else the
    base instance (the base and LoRA adapters). The calls the cycle and the probes make."""

    def __init__(self, base: vllm.VLLMClient, merged: MergedServers | None):
        self.base, self.merged = base, merged

    def client(self, model: str) -> vllm.VLLMClient:
        instance = self.merged.instances.get(model) if self.merged else None
        return instance.client if instance else self.base

    async def load_merged(self, served_name: str, folder: Path) -> None:
        if self.merged is None:
            raise RuntimeError(f"{folder.name} holds merged weights, which need a vLLM instance cld starts itself "
                               "(not serve.vllm_url)")
        await self.merged.start(served_name, folder)

    async def load_lora(self, name: str, path: Path) -> None:
        await self.base.load_lora(name, path)

    async def unload_lora(self, name: str) -> None:
        """Unload an adapter, or stop the instance of a merged-weight version."""
        if self.merged is not None and name in self.merged.instances:
            await self.merged.stop(name)
        else:
            await self.base.unload_lora(name)

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        return await self.base.healthy(timeout_s)

    async def models(self) -> list[dict]:
        return await self.base.models()

    async def served(self) -> set[str]:
        merged = {name for name, i in self.merged.instances.items() if name in self.merged.endpoints} \
            if self.merged else set()
        return await self.base.served() | merged

    async def base_model(self) -> str:
        return await self.base.base_model()

    async def sample(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     n: int) -> list[str]:
        return await self.client(model).sample(model, messages, max_tokens, temperature, n)

    async def token_nll(self, model: str, text: str | list[int]) -> list[float]:
        return await self.client(model).token_nll(model, text)

    async def chat_tokens(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        return await self.base.chat_tokens(messages, add_generation_prompt)

    async def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
        return await self.client(model).chat(model, messages, max_tokens)

    async def complete(self, model: str, prompt: str, max_tokens: int) -> str:
        return await self.client(model).complete(model, prompt, max_tokens)

"""Which model answers which public name.

Owns the mapping from the names clients use (`cld`, `cld-base`) to the names vLLM serves (the
base, or an adapter version such as `cld-v0003`) and to the vLLM instance that serves them (the
base instance, or a merged-weight version's own), and its persistence in `serving.json`, so a
restart serves the same version. Switching is a single assignment, so a request sees the old or
the new adapter, never a mix. Knows nothing of HTTP or of how adapters are made or judged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from daemon.layout import ADAPTERS_DIR, is_version
from replay.durable import DamagedFile, atomic_write_json, read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapter:
    """An adapter loaded (or to load) into vLLM under `served_name`, from the folder `path`."""

    version: str
    served_name: str
    path: Path


class Router:
    def __init__(self, model_name: str, base_served_name: str, state_file: Path):
        self.model_name = model_name
        self.base_name = f"{model_name}-base"
        self.base_served_name = base_served_name
        self.state_file = state_file
        self.current: Adapter | None = _load(state_file)
        self.in_flight: Counter[str] = Counter()
        # served names that a vLLM instance of their own answers (merged-weight versions,
        # daemon.engine.merged), with the client that reaches it; all others: the base instance
        self.endpoints: dict[str, httpx.AsyncClient] = {}
        self.last_active = time.monotonic()  # when a request last started or ended

    def idle_s(self) -> float:
        """Seconds since the last request started or ended; 0 while any is in flight."""
        return 0.0 if self.in_flight else time.monotonic() - self.last_active

    @property
    def public_names(self) -> list[str]:
        return [self.model_name, self.base_name]

    def resolve(self, public_name: str) -> str | None:
        """The vLLM model name behind a public name, or None for an unknown name."""
        if public_name == self.model_name:
            return self.current.served_name if self.current else self.base_served_name
        if public_name == self.base_name:
            return self.base_served_name
        return None

    def begin(self, served_name: str) -> None:
        """A request to `served_name` starts; `end` must follow (the front does both)."""
        self.in_flight[served_name] += 1
        self.last_active = time.monotonic()

    def end(self, served_name: str) -> None:
        self.in_flight[served_name] -= 1
        self.last_active = time.monotonic()
        if self.in_flight[served_name] <= 0:
            del self.in_flight[served_name]

    async def drained(self, served_name: str, timeout_s: float) -> bool:
        """Wait until no request to `served_name` is in flight (False if `timeout_s` passed first)."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight.get(served_name, 0) > 0:
            if time.monotonic() > deadline:
                log.warning("%d requests to %s still running after %.0f s", self.in_flight[served_name],
                            served_name, timeout_s)
                return False
            await asyncio.sleep(0.05)
        return True

    def switch(self, adapter: Adapter | None) -> None:
        """Serve `adapter` (None = the base) under the stable name from now on, persistently
        (its version and served name: the folder follows from the version)."""
        record = None if adapter is None else {"version": adapter.version, "served_name": adapter.served_name}
        atomic_write_json(self.state_file, {"current": record})
        self.current = adapter
        log.info("%s now serves %s", self.model_name, adapter.version if adapter else "the base model")


def _load(state_file: Path) -> Adapter | None:
    """The adapter `serving.json` names; its folder is always the version's own in this state
    directory (a path in the file is never trusted)."""
    found = read_json(state_file, default={})
    record = found.get("current") if isinstance(found, dict) else None
    if record is None:
        return None
    if not isinstance(record, dict) or not is_version(record.get("version")) or not record.get("served_name"):
        raise DamagedFile(f"{state_file} is damaged (it names no adapter version); remove it to serve the "
                          "base model, then `cld rollback VERSION`")
    return Adapter(record["version"], record["served_name"], state_file.parent / ADAPTERS_DIR / record["version"])

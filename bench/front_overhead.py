"""Overhead of cld's front (OpenAI proxy) against talking to vLLM directly, side by side.

    .venv/bin/python bench/front_overhead.py [--rounds 6] [--streams 16] [--tokens 64]

Starts `cld run` on a free port in a temporary state directory (vLLM on its socket there) (reusing ./var/model when it is
already prepared), then alternates direct-vLLM and through-the-front runs so that both see the
same machine load:
- latency: sequential 1-token completions; p50 of each path and the median paired difference;
- throughput: `--rounds` ABBA-ordered pairs of runs, each `--streams` concurrent streamed chat
  completions of `--tokens` tokens
  (ignore_eos, so both paths generate exactly the same work); tokens/s and the ratio.
Prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import machine  # beside this file

from daemon.engine import vllm
from daemon.service import spare_port

REPO = Path(__file__).resolve().parent.parent


def start_daemon(folder: Path) -> tuple[subprocess.Popen, str, str]:
    port = spare_port()
    prepared = REPO / "var" / "model"
    base = f'[model]\nbase = "{prepared}"\n' if (prepared / "config.json").is_file() else ""
    config = folder / "config.toml"
    # A one-document replay build, finished before measuring, so it does not load vLLM meanwhile.
    config.write_text(f'[state]\ndir = "state"\n[serve]\nport = {port}\n{base}'
                      '[replay]\nsynthetic_documents = 1\nrehearsal_prompts = 2\nrehearsal_held_out = 1\n'
                      '[schedule]\ninterval_s = 0\nmin_new_tokens = 0\n')
    log = open(folder / "daemon.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    front = f"http://127.0.0.1:{port}"
    for _ in range(900):
        if process.poll() is not None:
            sys.exit(f"cld run exited; see {folder / 'daemon.log'}")
        try:
            healthy = httpx.get(f"{front}/health", timeout=2).status_code == 200
            if healthy and httpx.get(f"{front}/api/status", timeout=5).json()["replay"]["source"]:
                return process, front, vllm.socket_address(vllm.sockets_dir(folder / "state") / vllm.BASE_SOCKET)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit("cld run did not become healthy")


async def one_token(client: httpx.AsyncClient, model: str) -> float:
    started = time.perf_counter()
    reply = await client.post("/v1/completions",
                              json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    reply.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def latency(direct: httpx.AsyncClient, front: httpx.AsyncClient, requests: int) -> dict[str, float]:
    direct_ms, front_ms = [], []
    for _ in range(requests):
        direct_ms.append(await one_token(direct, "cld-base"))
        front_ms.append(await one_token(front, "cld"))
    return {
        "direct_p50_ms": statistics.median(direct_ms),
        "front_p50_ms": statistics.median(front_ms),
        "added_p50_ms": statistics.median(f - d for f, d in zip(front_ms, direct_ms)),
    }


async def stream_tokens(client: httpx.AsyncClient, model: str, tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    generated = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    generated = usage["completion_tokens"]
    return generated


async def throughput(client: httpx.AsyncClient, model: str, streams: int, tokens: int) -> float:
    started = time.perf_counter()
    counts = await asyncio.gather(*(stream_tokens(client, model, tokens) for _ in range(streams)))
    if sum(counts) != streams * tokens:
        raise RuntimeError(f"expected {streams * tokens} tokens, got {sum(counts)}")
    return sum(counts) / (time.perf_counter() - started)


async def measure(direct_address: str, front_url: str, vllm_key: str, args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=args.streams * 2)
    # vLLM (on its socket) answers only with the key cld gave it; the front has no API key set.
    async with vllm.async_client(direct_address, httpx.Timeout(600), vllm_key, limits) as direct, \
            httpx.AsyncClient(base_url=front_url, timeout=600, limits=limits) as front:
        await throughput(direct, "cld-base", 4, 8)  # warm-up
        lat = await latency(direct, front, args.requests)
        direct_tps, front_tps = [], []
        for round_ in range(args.rounds):  # ABBA order, so drift in machine load favours neither path
            for path in (("direct", "front") if round_ % 2 == 0 else ("front", "direct")):
                if path == "direct":
                    direct_tps.append(await throughput(direct, "cld-base", args.streams, args.tokens))
                else:
                    front_tps.append(await throughput(front, "cld", args.streams, args.tokens))
    ratio = statistics.mean(front_tps) / statistics.mean(direct_tps)
    return {**lat, "direct_tok_s": statistics.mean(direct_tps), "front_tok_s": statistics.mean(front_tps),
            "throughput_ratio": ratio, "direct_runs": direct_tps, "front_runs": front_tps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per path for latency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cld-bench-") as folder:
        process, front, direct = start_daemon(Path(folder))
        try:
            vllm_key = (Path(folder) / "state" / "vllm.key").read_text()
            result = asyncio.run(measure(direct, front, vllm_key, args))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    print(json.dumps(result, indent=2))
    print(f"\nMachine: {machine.describe()}")
    print("| measure | direct vLLM | through cld front | result | target |")
    print("|---|---|---|---|---|")
    print(f"| p50 latency, 1-token completion | {result['direct_p50_ms']:.1f} ms | {result['front_p50_ms']:.1f} ms "
          f"| +{result['added_p50_ms']:.1f} ms (median paired) | ≤ 5 ms |")
    print(f"| throughput, {args.streams} streams × {args.tokens} tokens | {result['direct_tok_s']:.0f} tok/s "
          f"| {result['front_tok_s']:.0f} tok/s | ratio {result['throughput_ratio']:.3f} | ≥ 0.95 |")


if __name__ == "__main__":
    main()

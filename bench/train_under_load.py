"""Training beside a busy server: the trainer's speed and serving latency, apart and together,
with the trainer's OpenMP threads spinning while they wait (the OpenMP default) or sleeping
(cld's `TRAINER_ENV`), both at cld's CPU niceness for the trainer.

    .venv/bin/python bench/train_under_load.py [--steps 24] [--clients 2] [--rounds 2]

Starts `cld run` on the embedded model in a temporary state directory as bench/cycle_latency.py
does (a small synthetic replay corpus, so its build is over before measuring), then measures, in alternating order:
- serving alone: `--clients` loops of sequential 16-token chat requests to the front (p50, p90);
- the trainer alone (`python -m daemon.learning.train`, up to `--steps` steps of 256 tokens):
  tokens/s between its first and last step (model loading excluded);
- both at once: the trainer's tokens/s over at most `--window-s` (a starved trainer is stopped
  then) and the serving latency meanwhile.
Prints a Markdown table for docs/BENCHMARKS.md (machine and date included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import machine  # noqa: E402  (beside this file)
from cycle_latency import FACTS, start, status, wait  # noqa: E402

from daemon.config import TrainSection  # noqa: E402
from daemon.learning.cycle import TRAIN_NICENESS, TRAINER_ENV  # noqa: E402
from daemon.learning.jobs import JobData, TrainJob  # noqa: E402

POLICIES = {"spin (OpenMP default)": {}, "short spin (GOMP_SPINCOUNT=10000)": {"GOMP_SPINCOUNT": "10000"},
            "sleep (cld: TRAINER_ENV)": TRAINER_ENV}
SEQ_TOKENS = TrainSection().seq_len * TrainSection().batch_size  # tokens per optimizer step
QUESTION = {"messages": [{"role": "user", "content": "Name three rivers of Europe."}], "max_tokens": 16,
            "temperature": 0}


def job_file(folder: Path, steps: int) -> Path:
    words = FACTS.split()
    chunks = [{"text": " ".join(words[i:i + 180])} for i in range(0, len(words), 60)]
    hyper = TrainSection(method="lora", max_steps=steps, epochs=1000, early_stop_patience=0, replay_loss="lm", new_repeats=1)
    job = TrainJob(version="v0001", base_model=str(folder / "state" / "model"), output_dir=str(folder / "out"),
                   data=JobData(new=chunks), hyper=hyper)
    (folder / "out").mkdir(exist_ok=True)
    path = folder / "job.json"
    path.write_text(job.model_dump_json())
    return path


def train(job: Path, policy: dict[str, str], window_s: float) -> float:
    """Run the trainer as the daemon does (niced, `--json-progress`) with OpenMP `policy` for at
    most `window_s` after its first step; its tokens/s between its first and last step seen (a
    starved trainer is stopped at the window's end, not waited for)."""
    env = {key: value for key, value in os.environ.items() if key not in TRAINER_ENV}
    process = subprocess.Popen([sys.executable, "-m", "daemon.learning.train", str(job), "--json-progress"],
                               env={**env, **policy}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: os.nice(TRAIN_NICENESS))
    steps: list[tuple[float, int]] = []  # (time, step) of each progress event
    deadline = [float("inf")]

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "progress":
                steps.append((time.monotonic(), event["step"]))
                deadline[0] = min(deadline[0], steps[0][0] + window_s)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while process.poll() is None and time.monotonic() < deadline[0]:
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()
    process.wait()
    reader.join(5)
    if not steps:
        sys.exit(f"the trainer made no step:\n{process.stderr.read()[-3000:] if process.stderr else ''}")
    (first_s, first), (last_s, last) = steps[0], steps[-1]
    if last == first:  # no second step within the window: slower than one step per window
        return 0.0
    return (last - first) * SEQ_TOKENS / (last_s - first_s)


async def ask_until(url: str, clients: int, stop: asyncio.Event) -> list[float]:
    latencies: list[float] = []

    async def loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            reply = await client.post(f"{url}/v1/chat/completions", json={"model": "cld-base", **QUESTION})
            reply.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(loop(client) for _ in range(clients)))
    return latencies


async def serve_alone(url: str, clients: int, seconds: float) -> list[float]:
    stop = asyncio.Event()
    asking = asyncio.create_task(ask_until(url, clients, stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await asking


async def together(url: str, clients: int, job: Path, policy: dict[str, str],
                   window_s: float) -> tuple[float, list[float]]:
    stop = asyncio.Event()
    asking = asyncio.create_task(ask_until(url, clients, stop))
    tokens_per_s = await asyncio.to_thread(train, job, policy, window_s)
    stop.set()
    return tokens_per_s, await asking


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=10)[int(q * 10) - 1] if len(values) >= 10 else max(values)


def table(results: dict[str, dict[str, list]], window_s: float) -> str:
    lines = [f"Machine: {machine.describe()}", "",
             "| trainer threads | trainer alone tok/s | trainer with serving tok/s | serving p50 / p90 ms, alone "
             "| serving p50 / p90 ms, with trainer |", "|---|---|---|---|---|"]
    alone = results["serving alone"]["latency"]
    for name in POLICIES:
        found = results[name]
        busy = found["latency"]
        busy_tok_s = statistics.mean(found["together"])
        shown = f"{busy_tok_s:.0f}" if busy_tok_s else f"< {SEQ_TOKENS / window_s:.0f} (no step in {window_s:.0f} s)"
        lines.append(f"| {name} | {statistics.mean(found['alone']):.0f} | {shown} "
                     f"| {statistics.median(alone) * 1e3:.0f} / {quantile(alone, 0.9) * 1e3:.0f} "
                     f"| {statistics.median(busy) * 1e3:.0f} / {quantile(busy, 0.9) * 1e3:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--window-s", type=float, default=90.0, help="longest a trainer run is measured")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve-s", type=float, default=30.0, help="length of each serving-alone measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cld-bench-") as name:
        folder = Path(name)
        process, url = start(folder)
        try:
            wait(url, lambda s: s["daemon"].get("phase") == "serving" and s["replay"]["source"], 1800)
            print(f"daemon ready; replay built: {status(url)['replay']}", flush=True)
            job = job_file(folder, args.steps)
            results: dict[str, dict[str, list]] = {"serving alone": {"latency": []}}
            results.update({policy: {"alone": [], "together": [], "latency": []} for policy in POLICIES})
            for round_ in range(args.rounds):  # alternate the order, so drift in machine load favours neither
                order = list(POLICIES) if round_ % 2 == 0 else list(reversed(POLICIES))
                results["serving alone"]["latency"] += asyncio.run(serve_alone(url, args.clients, args.serve_s))
                for policy in order:
                    results[policy]["alone"].append(train(job, POLICIES[policy], args.window_s))
                    tokens_per_s, latencies = asyncio.run(together(url, args.clients, job, POLICIES[policy],
                                                                   args.window_s))
                    results[policy]["together"].append(tokens_per_s)
                    results[policy]["latency"] += latencies
                    print(f"round {round_ + 1}, {policy}: alone {results[policy]['alone'][-1]:.0f} tok/s, "
                          f"with serving {tokens_per_s:.0f} tok/s, serving p50 "
                          f"{statistics.median(latencies) * 1e3:.0f} ms", flush=True)
        finally:
            process.terminate()
            process.wait(120)
    print(json.dumps({name: {key: [round(v, 4) for v in values] for key, values in found.items()}
                      for name, found in results.items()}))
    print(table(results, args.window_s))


if __name__ == "__main__":
    main()

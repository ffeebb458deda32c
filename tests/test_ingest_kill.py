"""SIGKILL the ingesting process at random moments, many times; then every input file must be
accounted for exactly once: one journal record each, the file where the record says (good ones
in processed/, bad ones in quarantine/ beside their reason), nothing left in the inbox, one
document per distinct content, every document chunked."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.ingestion.inbox import reason_path
from daemon.ingestion.ingest import open_ingester
from tests.conftest import REPO
from tests.ingest_helpers import BAD, GOOD, make_settings

pytestmark = pytest.mark.slow

BATCHES = 5
MAX_FILES_PER_RUN = 25
MAX_RUNS_PER_BATCH = 200
SEED = int(os.environ.get("CLD_TEST_KILL_SEED", "20240601"))


def batch_files(batch: int, rng: random.Random) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what it must become): `doc:<group>` (files of one group hold the same
    text, so one document) or `bad:<words of its reason>`."""
    files: dict[str, tuple[bytes, str]] = {}
    for i in range(80):
        filler = (f"w{rng.randrange(10**6)}" for _ in range(rng.randint(5, 1500)))
        text = f"Batch {batch} document {i}. " + " ".join(filler)
        files[f"b{batch}/doc{i}.txt"] = (text.encode(), f"doc:{batch}-{i}")
        if i % 3 == 0:  # the same text, spaced differently, under another name and type
            files[f"b{batch}/copies/doc{i}.md"] = (text.replace(" ", "  ").encode() + b"\r\n", f"doc:{batch}-{i}")
    files[f"b{batch}/shared.txt"] = (b"A fact every batch repeats.", "doc:shared")
    files.update({f"b{batch}/{name}": (data, f"doc:{name}") for name, data in GOOD.items()})
    files.update({f"b{batch}/{name}": (data, f"bad:{words}") for name, (data, words) in BAD.items()})
    return files


def run_until_done(config: Path, rng: random.Random) -> int:
    """Start the ingester again and again, each time killing it after it has logged a random
    number of files (0-MAX_FILES_PER_RUN) plus a random few milliseconds, so kills land at every
    step of a file's intake; stop at the first run that ends by itself. Returns the kills."""
    for kills in range(MAX_RUNS_PER_BATCH):
        child = subprocess.Popen([sys.executable, "-m", "daemon.ingestion.watch", "--config", str(config)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert child.stdout is not None
        lines = [child.stdout.readline() for _ in range(rng.randint(0, MAX_FILES_PER_RUN))]
        time.sleep(rng.uniform(0, 0.01))
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        output = "".join(lines) + child.stdout.read()
        child.stdout.close()
        if child.wait() == 0:
            return kills
        assert child.returncode == -signal.SIGKILL, output[-3000:]
    raise AssertionError(f"the inbox was not empty after {MAX_RUNS_PER_BATCH} runs")


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    rng = random.Random(SEED)
    expected: dict[str, tuple[bytes, str]] = {}
    kills = 0
    started = time.monotonic()
    for batch in range(BATCHES):
        files = batch_files(batch, rng)
        for name, (data, _) in files.items():
            path = settings.watch.inbox / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        expected.update(files)
        kills += run_until_done(tmp_path / "config.toml", rng)
    print(f"{kills} kills over {BATCHES} batches of {len(files)} files in {time.monotonic() - started:.0f} s")
    assert kills >= 5 * BATCHES, "too few kills landed while files were being ingested"
    check_accounted(settings, expected)


def check_accounted(settings: Settings, expected: dict[str, tuple[bytes, str]]) -> None:
    state = settings.state.dir
    assert [p for p in settings.watch.inbox.rglob("*") if p.is_file() and not p.name.startswith(".")] == []
    with open_ingester(settings) as ingester:
        inputs = ingester.journal.inputs()
        assert ingester.journal.pending() == []
        ready = ingester.journal.documents("ready")
        chunks = {doc["id"]: ingester.journal.chunks([doc["id"]]) for doc in ready}
    assert Counter(r.name for r in inputs) == Counter(list(expected)), "each input is recorded exactly once"
    assert all(r.moved for r in inputs)
    stored = {r.stored_as for r in inputs}
    on_disk = {p.relative_to(state).as_posix() for folder in ("processed", "quarantine")
               for p in (state / folder).rglob("*") if p.is_file() and not p.name.startswith(".")
               and not p.name.endswith(".reason")}
    assert on_disk == stored, "every stored file has a record and every record its file"
    groups: dict[str, set[int]] = {}
    for recorded in inputs:
        data, fate = expected[recorded.name]
        assert (state / recorded.stored_as).read_bytes() == data
        if fate.startswith("bad:"):
            assert recorded.outcome == "quarantined" and fate[4:] in recorded.reason
            assert reason_path(state / recorded.stored_as).read_text().startswith(recorded.reason)
        else:
            assert recorded.outcome in ("document", "duplicate")
            groups.setdefault(fate, set()).add(recorded.document_id)
    assert all(len(ids) == 1 for ids in groups.values()), "one document per distinct content"
    assert sorted(next(iter(ids)) for ids in groups.values()) == sorted(doc["id"] for doc in ready)
    assert Counter(r.outcome for r in inputs)["document"] == len(groups)
    assert all(chunks[doc["id"]] for doc in ready), "every document is chunked"

"""Ingestion throughput: 10,000 small files, and one 50 MB text file.

    .venv/bin/python bench/ingest.py [--files 10000] [--big-mb 50] [--model MODEL_DIR]

Each case drops its files into the inbox of a fresh state directory, then runs the ingester the
way `cld ingest` does when no daemon runs (`python -m daemon.ingestion.watch`, in a child process so its
peak RSS is its own): read, normalise, dedup, journal (SQLite, fsync per commit), move, and chunk
with the base model's tokenizer (the prepared embedded model unless --model names a folder).
Prints files/s, MB/s and the child's peak RSS as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon import model  # noqa: E402
from daemon.config import load_settings  # noqa: E402
from daemon.ingestion import journal  # noqa: E402
from daemon.layout import StateDir  # noqa: E402


def sentences() -> list[str]:
    """Real English: the sentences of the standard library's docstrings."""
    import argparse as a
    import collections
    import json
    import pathlib
    import subprocess as s
    import textwrap as t

    found: list[str] = []
    for module in (a, collections, json, pathlib, s, t, random, os):
        for name in dir(module):
            doc = getattr(getattr(module, name), "__doc__", None)
            if not isinstance(doc, str):
                continue
            found += [part.strip() + "." for part in " ".join(doc.split()).split(". ") if len(part) > 30]
    return sorted(set(found))


def small_files(inbox: Path, count: int, pool: list[str], rng: random.Random) -> int:
    total = 0
    for i in range(count):
        text = f"Note {i}. " + " ".join(rng.sample(pool, rng.randint(2, 12)))
        path = inbox / f"batch{i // 1000:02d}" / f"note{i:05d}.{('txt', 'md')[i % 2]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        total += path.write_bytes(text.encode())
    return total


def big_file(inbox: Path, megabytes: float, pool: list[str], rng: random.Random) -> int:
    inbox.mkdir(parents=True, exist_ok=True)
    target, written = int(megabytes * 1_000_000), 0
    with open(inbox / "big.txt", "w", encoding="utf-8") as out:
        while written < target:
            paragraph = " ".join(rng.choices(pool, k=rng.randint(3, 10))) + "\n\n"
            written += out.write(paragraph)
    return (inbox / "big.txt").stat().st_size


def run_case(name: str, model_dir: Path, fill, files_expected: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="cld-bench-") as tmp:
        state = StateDir(Path(tmp) / "state")
        size = fill(state.inbox)
        env = {**os.environ, "CLD_STATE__DIR": str(state.root), "CLD_MODEL__BASE": str(model_dir),
               "CLD_WATCH__STABLE_S": "0", "CLD_LOG__LEVEL": "WARNING"}
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "daemon.ingestion.watch"], cwd=tmp, env={**env, "PYTHONPATH": str(REPO)},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        assert os.waitstatus_to_exitcode(status) == 0, f"{name}: the ingester failed"
        book = journal.Journal(state.journal)
        try:
            ready = book.documents("ready")
        finally:
            book.close()
        assert len(ready) == files_expected, f"{name}: {len(ready)} documents chunked, not {files_expected}"
        tokens = sum(doc["tokens"] for doc in ready)
    return {"case": name, "files": files_expected, "mb": size / 1e6, "s": seconds, "tokens": tokens,
            "rss_mib": usage.ru_maxrss / 1024}


def base_model(given: str | None) -> Path:
    if given:
        return Path(given).resolve()
    settings = load_settings(REPO / "config.toml")
    return model.prepare(settings.model.base, StateDir(settings.state.dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--big-mb", type=float, default=50.0)
    parser.add_argument("--model", help="model folder with tokenizer.json (default: the prepared embedded model)")
    args = parser.parse_args()
    model_dir = base_model(args.model)
    pool = sentences()
    rows = [
        run_case(f"{args.files:,} small files", model_dir,
                 lambda inbox: small_files(inbox, args.files, pool, random.Random(0)), args.files),
        run_case(f"one {args.big_mb:g} MB text file", model_dir,
                 lambda inbox: big_file(inbox, args.big_mb, pool, random.Random(1)), 1),
    ]
    print(f"python {platform.python_version()}, tokenizer: {model_dir}\n")
    print("| case | files/s | MB/s | tokens/s | wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['files'] / row['s']:,.3g} | {row['mb'] / row['s']:.2f} | "
              f"{row['tokens'] / row['s']:,.0f} | {row['s']:.1f} | {row['rss_mib']:.0f} |")


if __name__ == "__main__":
    main()

"""Replay buffer benchmark: embedding throughput on CPU; FAISS build, query latency and recall at 1M.

    .venv/bin/python bench/replay_buffer.py [--vectors 1000000] [--queries 1000] [--passages 512]

Embeds passages of 64 and 200 tokens with the default embedder (all-MiniLM-L6-v2); builds the
index that `replay.index` chooses for N random unit vectors of dimension 384 (uniform on the
sphere: the worst case for any approximate index) and for N clustered ones (1,000 topics × 100
subtopics: closer to real sentence embeddings), then times single queries (k = 16) and measures recall@16 against exact
search. Prints a Markdown section for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import time

import faiss
import machine  # beside this file
import numpy as np

from replay import index
from replay.embed import DEFAULT_EMBEDDER, load_embedder
from replay.prompts import TOPICS

DIM = 384
K = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--passages", type=int, default=512)
    args = parser.parse_args()
    lines = [f"Machine: {machine.describe()}, {faiss.omp_get_max_threads()} threads; "
             f"faiss {faiss.__version__}, Python {platform.python_version()}; load average at start "
             f"{os.getloadavg()[0]:.1f}.", ""]
    lines += embedding_section(args.passages)
    for kind in ("uniform", "clustered"):
        lines += index_section(kind, args.vectors, args.queries)
        gc.collect()
    lines.append(f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    print("\n".join(lines))


def embedding_section(count: int) -> list[str]:
    embedder = load_embedder(DEFAULT_EMBEDDER)
    rows = ["| passage length | passages | seconds | passages/s |", "|---|---|---|---|"]
    for tokens in (64, 200):
        texts = [_passage(embedder, tokens, seed) for seed in range(count)]
        embedder.encode(texts[:32])  # warm-up
        started = time.perf_counter()
        embedder.encode(texts)
        seconds = time.perf_counter() - started
        rows.append(f"| {tokens} tokens | {count} | {seconds:.1f} | {count / seconds:.1f} |")
    return [f"Embedding ({DEFAULT_EMBEDDER}, fp32, batch 32, torch threads = cores):", "", *rows, ""]


def _passage(embedder, tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    adjectives, people = ["old", "new", "large", "rare", "famous"], ["people", "scientists", "children", "cooks"]
    words = " ".join(f"The {rng.choice(TOPICS)} is {rng.choice(adjectives)} and {rng.choice(people)} like it."
                     for _ in range(tokens // 4))
    spans = embedder.spans(words)[:tokens]
    return words[:spans[-1][1]]


def index_section(kind: str, count: int, queries_count: int) -> list[str]:
    rng = np.random.default_rng(0)
    points = _vectors(kind, count + queries_count, rng)
    vectors, queries = points[:count], points[count:]
    del points
    ids = np.arange(1, count + 1, dtype=np.int64)

    def rows(wanted: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(vectors[wanted - 1])

    started = time.perf_counter()
    built = index.build(rows, ids, DIM)
    build_s = time.perf_counter() - started
    latencies = _latencies(built.index, queries)
    _, found = built.index.search(queries, K)
    started = time.perf_counter()
    truth = index.exact_neighbours(rows, ids, queries, K)
    exact_ms = (time.perf_counter() - started) / len(queries) * 1e3
    recall = index.recall(found, truth, None, K)
    curve = _nprobe_curve(built, queries, truth) if built.nprobe else []
    return [
        f"FAISS, {count:,} {kind} random vectors × {DIM} (index chosen: `{built.kind}`, nprobe {built.nprobe}):", "",
        "| build (train + add + tune) | query p50 | query p99 | recall@16 | exact search per query |",
        "|---|---|---|---|---|",
        f"| {build_s:.1f} s | {np.percentile(latencies, 50):.3f} ms | {np.percentile(latencies, 99):.3f} ms | "
        f"{recall:.3f} | {exact_ms:.1f} ms |", "", *curve,
    ]


def _vectors(kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors: uniform on the sphere, or two-level clustered like topics and their subtopics."""
    out = rng.standard_normal((count, DIM), dtype=np.float32)
    if kind == "clustered":  # 1,000 topics × 100 subtopics; ~10 vectors per subtopic
        topics = rng.standard_normal((1_000, DIM), dtype=np.float32)
        subtopics = np.repeat(topics, 100, axis=0) + 0.8 * rng.standard_normal((100_000, DIM), dtype=np.float32)
        for start in range(0, count, 100_000):
            block = out[start:start + 100_000]
            block *= 0.7
            block += subtopics[rng.integers(0, len(subtopics), len(block))]
    faiss.normalize_L2(out)
    return out


def _latencies(built: faiss.Index, queries: np.ndarray) -> np.ndarray:
    for query in queries[:50]:  # warm-up
        built.search(query[None], K)
    times = []
    for query in queries:
        started = time.perf_counter()
        built.search(query[None], K)
        times.append((time.perf_counter() - started) * 1e3)
    return np.array(times)


def _nprobe_curve(built: index.Built, queries: np.ndarray, truth: np.ndarray) -> list[str]:
    rows = ["| nprobe | query p50 | query p99 | recall@16 |", "|---|---|---|---|"]
    for nprobe in sorted({1, 4, 16, built.nprobe, 128}):
        built.index.nprobe = nprobe
        latencies = _latencies(built.index, queries[:300])
        _, found = built.index.search(queries, K)
        rows.append(f"| {nprobe} | {np.percentile(latencies, 50):.3f} ms | {np.percentile(latencies, 99):.3f} ms | "
                    f"{index.recall(found, truth, None, K):.3f} |")
    built.index.nprobe = built.nprobe
    return [*rows, ""]



if __name__ == "__main__":
    main()

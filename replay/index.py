"""FAISS indexes of the replay buffer: choose the kind by size, build, tune, save and load.

Owns the choice of index (exact inner product up to EXACT_MAX vectors; above, IVF-Flat with about
4·√N lists and `nprobe` tuned at build time for recall within a fixed per-query scan budget) and
the index files, written atomically. Vectors are unit length, so inner product is cosine
similarity. Knows nothing of passages or of the corpus: it maps ids to vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from replay.durable import atomic_write

EXACT_MAX = 50_000
TRAIN_POINTS_PER_LIST = 40  # k-means wants at least 39 per centroid
KMEANS_ITERATIONS = 10
# Most vectors one query may compare with (centroids included): ≈ 1 ms on 2 CPU cores at 384 dims.
SCAN_BUDGET = 14_336
TARGET_RECALL = 0.95
TUNE_QUERIES = 200
TUNE_K = 16
ADD_CHUNK = 65_536

# Rows of the vectors for the given ids, as a contiguous float32 array.
VectorRows = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Built:
    index: faiss.Index
    kind: str  # "flat" or "ivf<lists>"
    nprobe: int  # 0 for flat


def kind_for(count: int) -> str:
    return "flat" if count <= EXACT_MAX else f"ivf{lists_for(count)}"


def lists_for(count: int) -> int:
    return max(1, int(4 * math.sqrt(count)))


def build(rows: VectorRows, ids: np.ndarray, dim: int, seed: int = 0) -> Built:
    """An index of the vectors of `ids` (searching it returns those ids)."""
    if len(ids) <= EXACT_MAX:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if len(ids):
            index.add_with_ids(rows(ids), ids)
        return Built(index, "flat", 0)
    rng = np.random.default_rng(seed)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists_for(len(ids)), faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    sample = np.sort(rng.choice(ids, min(len(ids), index.nlist * TRAIN_POINTS_PER_LIST), replace=False))
    index.train(rows(sample))
    for start in range(0, len(ids), ADD_CHUNK):
        chunk = ids[start:start + ADD_CHUNK]
        index.add_with_ids(rows(chunk), chunk)
    index.nprobe = tune_nprobe(index, rows, ids, rng)
    return Built(index, f"ivf{index.nlist}", index.nprobe)


def tune_nprobe(index: faiss.IndexIVF, rows: VectorRows, ids: np.ndarray, rng: np.random.Generator) -> int:
    """The smallest nprobe (doubling) that reaches TARGET_RECALL, or the most the scan budget allows."""
    queries_ids = np.sort(rng.choice(ids, min(len(ids), TUNE_QUERIES), replace=False))
    queries = rows(queries_ids)
    truth = exact_neighbours(rows, ids, queries, TUNE_K + 1)
    most = max(1, (SCAN_BUDGET - index.nlist) * index.nlist // index.ntotal)
    nprobe = 1
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, TUNE_K + 1)
        if nprobe >= most or recall(found, truth, queries_ids, TUNE_K) >= TARGET_RECALL:
            return nprobe
        nprobe = min(2 * nprobe, most)


def exact_neighbours(rows: VectorRows, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k nearest of `ids` to each query, by brute force in chunks."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(ids), ADD_CHUNK):
        chunk = ids[start:start + ADD_CHUNK]
        scores, positions = faiss.knn(queries, rows(chunk), min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(positions >= 0, chunk[np.maximum(positions, 0)], -1))
    heap.finalize()
    return heap.I


def recall(found: np.ndarray, truth: np.ndarray, exclude: np.ndarray | None, k: int) -> float:
    """Mean share of the true k nearest found, leaving out each query's own id (`exclude`)."""
    hits = 0
    for row, (got, want) in enumerate(zip(found, truth)):
        own = {int(exclude[row])} if exclude is not None else set()
        want_k = [i for i in want if i not in own and i >= 0][:k]
        got_k = {i for i in got if i not in own and i >= 0}
        hits += len(got_k.intersection(want_k)) / max(1, len(want_k))
    return hits / max(1, len(found))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the k nearest, one row per query; missing hits have id -1."""
    if index.ntotal == 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))


def save(index: faiss.Index, path: Path) -> None:
    atomic_write(path, lambda handle: faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write)))


def load(path: Path, nprobe: int = 0) -> faiss.Index:
    """Read an index file (an IVF one searches `nprobe` lists); raises RuntimeError when it is damaged."""
    loaded = faiss.read_index(str(path))
    if nprobe and isinstance(loaded, faiss.IndexIVF):
        loaded.nprobe = nprobe
    return loaded

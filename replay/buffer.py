"""A built replay buffer opened for reading: search it, sample it, fetch passages and pairs.

Owns reading what `replay.build` published (the manifest names the index files), the separation
of training passages (what selection may use) from held-out ones (what the forgetting probes use),
and the behaviour-rehearsal pairs, split the same way. Knows nothing of how passages are chosen
for a cycle (`replay.select`) nor of the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from replay import files, index
from replay.durable import read_json
from replay.embed import Embedder, load_embedder
from replay.store import PassageStore, StoredPassage


class BufferMissing(RuntimeError):
    """No complete replay buffer in the folder yet; the message says how to build one."""


@dataclass(frozen=True)
class Hit:
    score: float
    passage: StoredPassage


@dataclass(frozen=True)
class RehearsalPair:
    prompt: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


class ReplayBuffer:
    def __init__(self, folder: Path, found: dict[str, Any], embedder: Embedder | None = None):
        self.folder = folder
        self.manifest = found
        self.store = PassageStore(folder, readonly=True)
        parts = found["indexes"]
        self.train_index = index.load(folder / parts["train"]["file"], parts["train"]["nprobe"])
        self.held_out_index = index.load(folder / parts["held_out"]["file"], parts["held_out"]["nprobe"])
        self._embedder = embedder

    @classmethod
    def open(cls, folder: Path, embedder: Embedder | None = None) -> ReplayBuffer:
        found = files.read_manifest(folder)
        if found is None:
            raise BufferMissing(f"no replay buffer in {folder} yet: run `cld replay build` (or let `cld run` build it)")
        if embedder is not None and embedder.name != found["embedder"]:
            raise ValueError(f"the buffer in {folder} was built with {found['embedder']}, not {embedder.name}")
        return cls(folder, found, embedder)

    def close(self) -> None:
        self.store.close()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.manifest["embedder"])
        return self._embedder

    @property
    def mean_tokens(self) -> float:
        return self.manifest["tokens"] / max(1, self.manifest["passages"])

    @cached_property
    def train_ids(self) -> np.ndarray:
        return self.store.ids(held_out=False)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts) if texts else np.zeros((0, self.manifest["dim"]), np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self.embedder.spans(text))

    def nearest(self, queries: np.ndarray, k: int, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest training (or held-out) passages to each query vector."""
        return index.search(self.held_out_index if held_out else self.train_index, queries, k)

    def passages(self, ids: Any) -> list[StoredPassage]:
        return self.store.get(int(i) for i in ids if i >= 0)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.store.vectors(self.manifest["dim"])[np.asarray(ids, dtype=np.int64) - 1])

    def query(self, text: str, k: int) -> list[Hit]:
        """The k passages nearest to `text`, training and held-out alike, best first."""
        vector = self.embed([text])
        hits: list[Hit] = []
        for held_out in (False, True):
            scores, ids = self.nearest(vector, k, held_out)
            found = {p.id: p for p in self.passages(ids[0])}
            hits += [Hit(float(s), found[int(i)]) for s, i in zip(scores[0], ids[0]) if int(i) in found]
        return sorted(hits, key=lambda hit: -hit.score)[:k]

    def held_out_passages(self, count: int, near: list[str] | None = None, seed: int = 0) -> list[StoredPassage]:
        """Held-out passages for the forgetting probe: half nearest to `near` (most at risk), half random."""
        chosen: dict[int, None] = {}
        if near:
            _, ids = self.nearest(self.embed(near), max(1, count // 2 // len(near) + 1), held_out=True)
            chosen.update(dict.fromkeys(int(i) for i in ids.T.ravel() if i >= 0))
        pool = self.store.ids(held_out=True)
        rng = np.random.default_rng(seed)
        for i in rng.permutation(pool):
            if len(chosen) >= count:
                break
            chosen.setdefault(int(i), None)
        return self.passages(list(chosen)[:count])


def load_rehearsal(folder: Path) -> tuple[list[RehearsalPair], list[RehearsalPair]]:
    """(training pairs, held-out pairs for the behaviour probe); both empty when none were made."""
    found = read_json(folder / files.REHEARSAL_FILE, lenient=True) or {}
    pairs = found.get("pairs", [])
    train = [RehearsalPair(p["prompt"], p["answer"]) for p in pairs if not p["held_out"]]
    held = [RehearsalPair(p["prompt"], p["answer"]) for p in pairs if p["held_out"]]
    return train, held

"""Helpers for the replay tests: a tiny deterministic embedder and corpora with known neighbours."""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from replay.embed import register_embedder

WORD = re.compile(r"\S+")
TOPICS = ("ships", "cats", "stars", "bread", "chess", "rain")


class BagOfWords:
    """Feature-hashed bag of words: texts that share words are near. Counts what it encodes."""

    def __init__(self, name: str = "test-bow", dim: int = 256):
        self.name = name
        self.dim = dim
        self.encoded = 0

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [match.span() for match in WORD.finditer(text)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in WORD.findall(text.lower()):
                out[row, zlib.crc32(word.strip(".,").encode()) % self.dim] += 1
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        self.encoded += len(texts)
        return out


def use_embedder(embedder: BagOfWords) -> BagOfWords:
    register_embedder(embedder.name)(lambda: embedder)
    return embedder


def topic_text(topic: str, rng: random.Random, words: int = 18) -> str:
    """A paragraph in `topic`'s own vocabulary (topics share no words)."""
    return " ".join(f"{topic}{rng.randrange(8)}" for _ in range(words))


def write_topic_corpus(folder: Path, per_topic: int = 10, seed: int = 0) -> dict[str, list[str]]:
    """One .txt file per topic, one paragraph per passage (with passage_tokens=24); returns the texts."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts: dict[str, list[str]] = {}
    for topic in TOPICS:
        texts[topic] = [f"{topic_text(topic, rng)} n{topic}{i}" for i in range(per_topic)]
        (folder / f"{topic}.txt").write_text("\n\n".join(texts[topic]) + "\n")
    return texts

"""What the front calls for each request to the stable name: find the passages of ingested documents
near what it asks and put them in front of it, counting what it did.

Owns the recall settings at work ([recall]) and the counts of recalled and passed requests; the
embedding and search run in a worker thread, so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from daemon.config import RecallSection
from daemon.recall import frame
from daemon.recall.index import Document, Hit, RecallIndex
from replay.embed import Embedder, load_embedder

log = logging.getLogger(__name__)
EMBED_THREADS = 1  # the daemon's torch (the embedder's) leaves the other cores to vLLM
# passed: nothing near enough, or no room; not_asked: no text to recall for; failed: the embedder or
# the index failed (the request goes on as it came)
OUTCOMES = ("recalled", "passed", "not_asked", "off", "failed")


@dataclass
class Recalled:
    """A request as it goes on: its payload (with recalled passages in front, or as it came) and
    the passages it drew on."""

    payload: dict[str, Any]
    hits: list[Hit] = field(default_factory=list)


class Recaller:
    def __init__(self, settings: RecallSection, index: RecallIndex, max_model_len: int, specials: list[str] = (),
                 observe: Callable[[str, float], None] = lambda outcome, seconds: None):
        self.settings, self.index, self.max_model_len = settings, index, max_model_len
        self.specials = list(specials)
        self.observe = observe
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.seconds = 0.0  # spent on the requests it looked for passages for

    async def apply(self, path: str, payload: dict[str, Any]) -> Recalled:
        """`payload` with what its last user turn recalls in front of it (unchanged when nothing)."""
        started = time.perf_counter()
        asked = frame.asked(path, payload, self.max_model_len)
        if not self.settings.enabled or asked is None:
            return self._done("off" if not self.settings.enabled else "not_asked", started, Recalled(payload))
        try:
            hits = await asyncio.to_thread(self.find, asked.text)
        except Exception:  # recall must never cost a request its answer
            log.exception("recall failed; the request goes on without it")
            return self._done("failed", started, Recalled(payload))
        taken = frame.chosen(hits, self.settings.min_similarity, min(self.settings.max_tokens, asked.room))
        if not taken:
            return self._done("passed", started, Recalled(payload))
        return self._done("recalled", started,
                          Recalled(frame.with_recall(path, payload, frame.framed(taken, self.specials)), taken))

    def find(self, text: str) -> list[Hit]:
        """The passages nearest to `text` (recall.k, of the documents recall.documents names); with
        none indexed, nothing is embedded (nor the embedder loaded)."""
        if not self.index.view()["passages"]:
            return []
        return self.index.search(self.index.encode(text), self.settings.k, self.settings.documents == "unlearned")

    def view(self) -> dict[str, Any]:
        looked = self.counts["recalled"] + self.counts["passed"] + self.counts["failed"]
        return {"enabled": self.settings.enabled, **self.index.view(), "requests": dict(self.counts),
                "mean_ms": round(1000 * self.seconds / looked, 1) if looked else None}

    def _done(self, outcome: str, started: float, recalled: Recalled) -> Recalled:
        spent = time.perf_counter() - started
        self.counts[outcome] += 1
        self.seconds += spent if outcome in ("recalled", "passed", "failed") else 0.0
        self.observe(outcome, spent)
        return recalled


def open_index(folder: Path, embedder: str, passage_tokens: int) -> RecallIndex:
    """The recall index of a state directory (its embedder is loaded when first needed)."""
    return RecallIndex(folder, lambda: _embedder(embedder), passage_tokens)


def documents_of(rows: list[dict[str, Any]]) -> list[Document]:
    return [Document(row["id"], row["hash"], row["source"], row["state"]) for row in rows]


def template_tokens(model_dir: Optional[Path]) -> list[str]:
    """The special tokens of the base model's tokenizer (a document must not spell them): read from
    its tokenizer.json; none when it is not there (frame.TEMPLATE_MARKERS still applies)."""
    if model_dir is None:
        return []
    try:
        added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, ValueError):
        return []
    return [token["content"] for token in added if token.get("special") and isinstance(token.get("content"), str)]


def _embedder(name: str) -> Embedder:
    import torch

    torch.set_num_threads(EMBED_THREADS)
    return load_embedder(name)

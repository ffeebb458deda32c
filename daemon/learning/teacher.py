"""Questions and answers about a new document, written by a teacher model with the document in its
context: the generated form of augmentation (`augment.teacher_pairs`).

Facts trained in one phrasing are recalled word for word but seldom answered when asked in other
words; question/answer forms of each fact, in words other than the document's, make them
extractable (Physics of Language Models 3.1, arXiv 2309.14316; EntiGraph, arXiv 2409.07431; Active
Reading, arXiv 2508.09494). The teacher is the served base model (through cld's own vLLM) or any
OpenAI-compatible server (`augment.teacher_url`): it reads one passage at a time and writes a
question a reader could ask with its short answer, several samples per passage. What it writes is
kept only when the answer is supported by the document (every content word and number of the
answer occurs in it), the question does not give its answer away, and it is not a repeat —
a small teacher's wrong answers would otherwise be learned as facts.

Owns the prompts, the parsing and the filter (pure) and one `generate` call (I/O: the teacher).
Knows nothing of the journal, the cache or training; the cycle keeps what it returns per document.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from daemon.learning.probes import STOPWORDS

log = logging.getLogger(__name__)
PASSAGE_WORDS = 80          # a passage the teacher reads: whole sentences, about this many words
MAX_SAMPLES = 8             # samples asked per passage, at most
MAX_ANSWER_WORDS = 24
MIN_QUESTION_WORDS = 4
ANSWER_TOKENS = 96
CONCURRENCY = 4
PROMPT = ("Here is a passage from \"{title}\":\n\n{passage}\n\n"
          "Write one question a reader could ask about a fact in this passage, then its short answer taken "
          "from the passage. Use exactly this form:\nQ: <question>\nA: <answer>")
PAIR = re.compile(r"Q:\s*(?P<q>.+?)\s*\n+\s*A:\s*(?P<a>.+?)\s*(?=\n\s*Q:|\Z)", re.DOTALL)
WORD = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")


class Sampler(Protocol):
    async def sample(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     n: int) -> list[str]: ...


@dataclass
class Generated:
    """What the teacher wrote for one document: the pairs kept and how many of each kind were dropped."""

    teacher: str
    pairs: list[dict[str, str]] = field(default_factory=list)  # {"question", "answer"}
    asked: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def passages(paragraphs: Sequence[Sequence[str]], words: int = PASSAGE_WORDS) -> list[str]:
    """The document's sentences gathered into passages of about `words` words, never across a paragraph."""
    found = []
    for sentences in paragraphs:
        current: list[str] = []
        for sentence in sentences:
            if current and sum(len(s.split()) for s in current) + len(sentence.split()) > words:
                found.append(" ".join(current))
                current = []
            current.append(sentence)
        if current:
            found.append(" ".join(current))
    return [p for p in found if len(p.split()) >= MIN_QUESTION_WORDS]


def parse(reply: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a teacher's reply in the asked form, in order."""
    pairs = []
    for match in PAIR.finditer(reply.strip() + "\n"):
        question = " ".join(match.group("q").split())
        answer = " ".join(match.group("a").split()).strip("\"' ")
        if question and answer:
            pairs.append((question, answer))
    return pairs


def words(text: str) -> list[str]:
    return WORD.findall(text.lower().replace("’", "'"))


def content(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


def why_dropped(question: str, answer: str, document_words: set[str]) -> str | None:
    """Why a pair is not kept (None: kept): malformed, the answer not in the document, or given away."""
    if len(question.split()) < MIN_QUESTION_WORDS or not question.rstrip().endswith("?"):
        return "malformed"
    answer_words = content(answer.rstrip("."))
    if not answer_words or len(answer.split()) > MAX_ANSWER_WORDS:
        return "malformed"
    if any(w not in document_words for w in answer_words):
        return "unsupported"
    if set(answer_words) <= set(content(question)):
        return "answer in question"
    return None


def keep(candidates: Sequence[tuple[str, str]], document: str, limit: int) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The supported, distinct pairs (at most `limit`; no question twice, no answer more than twice)
    and the count of each reason the others were dropped."""
    document_words = set(words(document))
    kept: list[dict[str, str]] = []
    dropped: dict[str, int] = {}
    questions: set[tuple[str, ...]] = set()
    answers: dict[tuple[str, ...], int] = {}
    for question, answer in candidates:
        reason = why_dropped(question, answer, document_words)
        q_key, a_key = tuple(content(question)), tuple(content(answer))
        if reason is None and (q_key in questions or answers.get(a_key, 0) >= 2):
            reason = "duplicate"
        if reason is None and len(kept) >= limit:
            reason = "over the limit"
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        questions.add(q_key)
        answers[a_key] = answers.get(a_key, 0) + 1
        kept.append({"question": question, "answer": answer})
    return kept, dropped


async def generate(sampler: Sampler, model: str, paragraphs: Sequence[Sequence[str]], document: str, title: str,
                   limit: int, temperature: float) -> Generated:
    """Up to `limit` question/answer pairs about `document`, asked passage by passage of `model`
    (twice as many samples as pairs wanted, spread over the passages)."""
    chunks = passages(paragraphs)
    result = Generated(teacher=model)
    if not chunks or limit <= 0:
        return result
    samples = min(MAX_SAMPLES, math.ceil(2 * limit / len(chunks)))
    gate = asyncio.Semaphore(CONCURRENCY)

    async def ask(passage: str) -> list[str]:
        async with gate:
            messages = [{"role": "user", "content": PROMPT.format(title=title, passage=passage)}]
            return await sampler.sample(model, messages, ANSWER_TOKENS, temperature, samples)

    replies = await asyncio.gather(*(ask(p) for p in chunks))
    per_passage: list[list[tuple[str, str]]] = []
    for group in replies:
        found = [parse(reply) for reply in group]
        result.dropped["unparsed"] = result.dropped.get("unparsed", 0) + sum(1 for pairs in found if not pairs)
        per_passage.append([pair for pairs in found for pair in pairs])
    # round-robin over the passages, so that the limit keeps pairs about all of them
    ordered = [p[i] for i in range(max(map(len, per_passage))) for p in per_passage if i < len(p)]
    result.asked = len(chunks) * samples
    result.pairs, dropped = keep(ordered, document, limit)
    for reason, count in dropped.items():
        result.dropped[reason] = result.dropped.get(reason, 0) + count
    result.dropped = {reason: count for reason, count in result.dropped.items() if count}
    log.info("teacher %s: %d question/answer pairs kept of %d samples (dropped: %s)", model, len(result.pairs),
             result.asked, result.dropped or "none")
    return result


def records(generated: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat records to train on: each question answered (only the answer is learned)."""
    return [{"messages": [{"role": "user", "content": pair["question"]},
                          {"role": "assistant", "content": pair["answer"]}], "mask_prompt": True}
            for pair in generated.get("pairs", [])]

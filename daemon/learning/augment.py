"""Augmentation: training text beyond a document's raw chunks, so that its facts can be recalled
when asked in other words, not only continued word for word.

A fact trained in one phrasing and one context is stored but hard to extract by a question
(Physics of Language Models 3.1, arXiv 2309.14316); what makes it extractable is seeing it in
varied contexts and tied to its subject. Three deterministic forms, no model needed:

- shuffled: the document with the sentences of each paragraph, and the paragraphs, in another order;
- titled: every sentence prefixed with the document's subject (its title), so each fact names
  what it is about (the "full name" augmentation of the paper above);
- notes: for each named thing the document mentions (capitalised names, versions), a chat turn
  "What do you know about X?" answered with the sentences that mention it;
- quiz: each sentence as a chat question about the document with its key term (the last name,
  number or code span in it) blanked out, answered with the term, then the whole sentence: the
  fact is practised as an answer to a question, the way users will ask for it.

Context distillation (`open_book`): a chat record's answer learned toward what the base model
predicts with the document's passage in front of it, not only toward the answer's own tokens (the
student, asked without the passage, learns to answer as the base does while reading it; arXiv
2412.14964). The record carries the same conversation with the passage: the trainer computes the
base's distribution there.

Owns only text → records; pure (sentences are split as the cloze probes split them:
`probes.split_sentences`). Knows nothing of tokens, the journal or the trainer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from daemon.config import AUGMENT_FORMS as FORMS
from daemon.learning.probes import split_sentences, spread

Record = dict[str, Any]
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")
# Capitalised words in a row ("Ines Varga", "Quorrel Systems"), optionally with a version or
# number after them ("Tidewell 4.2").
NAME = re.compile(r"\b[A-Z][\w'’-]*[a-z0-9][\w'’-]*(?:\s+(?:[A-Z][\w'’-]+|\d+(?:\.\d+)*))*")
COMMON = frozenset(
    "A An The This That These Those It Its In On At For From By With And Or But If When While As After Before "
    "During Since Until Unlike Like We Our You Your They Their He She His Her I Each Every All Some Most Many "
    "Both Other Another Also However Then There Here What Which Who Why How Note See Use Yes No New One Two Much "
    "January February March April May June July August September October November December "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
)
QUESTIONS = ("What do you know about {}?", "Tell me about {}.", "What is known about {}?", "Who or what is {}?")
QUIZ = ("About {title}: {blank} What goes in the blank?", "{title}. Fill in the blank: {blank}",
        "A question on {title}: {blank} What is missing?")
CODE_SPAN = re.compile(r"`[^`]+`")
# a number, with its unit when one follows ("250 megabytes", "40 %"), not a word that merely follows it
NUMBER = re.compile(r"\b\d+(?:[.,]\d+)*(?:\s?%|\s(?!(?:which|that|and|or|but|after|before|when|while|where|in|on|at|"
                    r"to|of|for|from|by|with|as|is|are|was|were|the|a|an)\b)[a-z]+)?")
MIN_WORDS = 5          # shorter sentences (headings, fragments) carry no fact to tie to a subject
MAX_NOTE_SENTENCES = 6  # a note answers with at most this many sentences about its subject
CONTEXT_WORDS = 300     # the passage put in front of a context-distilled question: its paragraph and neighbours
OPEN_BOOK = "Read this document:\n\n{document}\n\nAnswer from the document: {question}"


def augment(text: str, source: str, forms: Sequence[str], shuffles: int, max_notes: int, seed: int,
            max_quiz: int = 24) -> list[Record]:
    """The records of `forms` for one document (`source`: its file name, the title of last resort)."""
    unknown = set(forms) - set(FORMS)
    if unknown:
        raise ValueError(f"unknown augmentation form(s) {sorted(unknown)}; known: {', '.join(FORMS)}")
    rng = random.Random(seed)
    paragraphs = split_paragraphs(text)
    title = title_of(text, source)
    records: list[Record] = []
    reorderable = len(paragraphs) > 1 or any(len(sentences) > 1 for sentences in paragraphs)
    if "shuffled" in forms and reorderable:
        records += [{"text": shuffled(paragraphs, rng)} for _ in range(shuffles)]
    if "titled" in forms:
        records += [{"text": " ".join(f"{title}: {s}" for s in sentences if len(s.split()) >= MIN_WORDS)}
                    for sentences in paragraphs if any(len(s.split()) >= MIN_WORDS for s in sentences)]
    if "notes" in forms:
        records += notes(paragraphs, title, max_notes)
    if "quiz" in forms:
        records += quiz(paragraphs, title, max_quiz)
    return records


def split_paragraphs(text: str) -> list[list[str]]:
    """Paragraphs (blank-line separated) as lists of sentences; code blocks are left out."""
    text = re.sub(r"```.*?(```|$)", "\n\n", text, flags=re.DOTALL)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip() and not HEADING.match(line)]
        if not lines:
            continue
        if len(lines) > 1 and all(re.match(r"([-*+]|\d+[.)])\s", line) for line in lines[1:]):
            sentences = lines  # a list: each item stands alone
        else:
            sentences = split_sentences(" ".join(lines))
        paragraphs.append(sentences)
    return paragraphs


def title_of(text: str, source: str) -> str:
    """The document's subject: its first heading, else a short first line, else its file name."""
    for line in text.splitlines():
        if match := HEADING.match(line):
            return match.group(1).strip()
        if line.strip():
            first = line.strip()
            if len(first.split()) <= 10 and not first.endswith((".", "!", "?", ":")):
                return first
            break
    stem = PurePath(source).name.split(".")[0] if source else ""
    return re.sub(r"[-_]+", " ", stem).strip() or "this document"


def shuffled(paragraphs: list[list[str]], rng: random.Random) -> str:
    """The paragraphs in a new order, each with its sentences in a new order."""
    order = [list(p) for p in paragraphs]
    rng.shuffle(order)
    for sentences in order:
        rng.shuffle(sentences)
    return "\n\n".join(" ".join(sentences) for sentences in order)


def names(sentence: str) -> list[str]:
    """Named things in a sentence: runs of capitalised words, without a leading common word. One
    capitalised word that opens the sentence is not taken: any first word is capitalised."""
    found = []
    for match in NAME.finditer(sentence):
        words = match.group(0).split()
        while words and words[0] in COMMON:
            words = words[1:]
        opening = match.start() == 0 and len(words) == len(match.group(0).split())
        if words and not words[0][0].isdigit() and not (len(words) == 1 and (len(words[0]) < 3 or opening)):
            found.append(" ".join(words).rstrip("'’"))
    return found


def notes(paragraphs: list[list[str]], title: str, limit: int) -> list[Record]:
    """Up to `limit` chat records, one per named thing, most mentioned first: a question about it,
    answered with the sentences that mention it (tied to the title)."""
    mentions: dict[str, list[str]] = {}
    for sentences in paragraphs:
        for sentence in sentences:
            if len(sentence.split()) < MIN_WORDS:
                continue
            for name in dict.fromkeys(names(sentence)):
                mentions.setdefault(name, []).append(sentence)
    chosen = sorted(mentions, key=lambda name: (-len(mentions[name]), name))[:limit]
    records = []
    for index, name in enumerate(chosen):
        answer = " ".join(mentions[name][:MAX_NOTE_SENTENCES])
        if name not in title:
            answer = f"{title}: {answer}"
        records.append({"messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)].format(name)},
                                     {"role": "assistant", "content": answer}]})
    return records


def key_term(sentence: str) -> str | None:
    """The span a question about the sentence would ask for: its last code span, number (with the
    word after it) or name; None when it has none."""
    found = [(m.start(), m.group(0)) for m in CODE_SPAN.finditer(sentence)]
    found += [(m.start(), m.group(0)) for m in NUMBER.finditer(sentence)]
    found += [(sentence.rfind(name), name) for name in names(sentence)]
    found = [(at, term) for at, term in found if at >= 0 and term and len(term) < len(sentence) // 2]
    return max(found)[1] if found else None


def quiz(paragraphs: list[list[str]], title: str, limit: int) -> list[Record]:
    """Up to `limit` chat records, evenly spread over the document: a sentence with its key term
    blanked, asked about the document, answered with the term and then the sentence."""
    items = []
    for sentences in paragraphs:
        for sentence in sentences:
            term = key_term(sentence) if len(sentence.split()) >= MIN_WORDS else None
            if term:
                at = sentence.rfind(term)
                items.append((sentence, term, sentence[:at] + "___" + sentence[at + len(term):]))
    # only the answer is learned: the blanked sentence learned as text would teach "___" as the fact
    return [{"messages": [{"role": "user", "content": QUIZ[index % len(QUIZ)].format(title=title, blank=blank)},
                          {"role": "assistant", "content": f"{term}. {sentence}"}], "mask_prompt": True}
            for index, (sentence, term, blank) in enumerate(spread(items, limit))]


def open_book(records: Sequence[Record], paragraphs: list[list[str]], mode: str) -> list[Record]:
    """Context distillation of the chat records (`augment.context_distill`): "beside" adds to each a
    copy learned toward the base's answer with its passage in front ("open_book": that conversation),
    "instead" replaces it by the copy, "off" leaves the records as they are."""
    if mode == "off" or not paragraphs:
        return list(records)
    asked = {id(r) for r in records if [m["role"] for m in r.get("messages", [])][-2:] == ["user", "assistant"]}
    copies = []
    for record in (r for r in records if id(r) in asked):
        *turns, question, answer = record["messages"]
        reading = {"role": "user", "content": OPEN_BOOK.format(document=passage(answer["content"], paragraphs),
                                                                question=question["content"])}
        copies.append({"messages": record["messages"], "mask_prompt": True, "open_book": [*turns, reading, answer]})
    kept = [r for r in records if id(r) not in asked] if mode == "instead" else list(records)
    return kept + copies


def passage(answer: str, paragraphs: list[list[str]]) -> str:
    """The document's passage an answer comes from: the paragraph that shares most words with it,
    with its neighbours while they fit in CONTEXT_WORDS (a longer paragraph: its sentence that shares
    most, with neighbouring sentences)."""
    wanted = set(re.findall(r"\w+", answer.lower()))
    texts = [" ".join(sentences) for sentences in paragraphs]
    best = _closest(wanted, texts)
    if len(texts[best].split()) > CONTEXT_WORDS:
        sentences = paragraphs[best]
        return " ".join(_around(sentences, _closest(wanted, sentences)))
    return "\n\n".join(_around(texts, best))


def _closest(wanted: set[str], texts: list[str]) -> int:
    return max(range(len(texts)), key=lambda i: (len(wanted & set(re.findall(r"\w+", texts[i].lower()))), -i))


def _around(texts: list[str], best: int) -> list[str]:
    """texts[best] and its neighbours on both sides while they fit in CONTEXT_WORDS."""
    first = last = best
    size = len(texts[best].split())
    grown = True
    while grown:
        grown = False
        for i in (last + 1, first - 1):
            if 0 <= i < len(texts) and size + len(texts[i].split()) <= CONTEXT_WORDS:
                first, last, size, grown = min(first, i), max(last, i), size + len(texts[i].split()), True
    return texts[first : last + 1]

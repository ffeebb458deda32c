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
  fact is practised as an answer to a question, the way users will ask for it;
- questions: for every fact-bearing sentence and each fact in it (a date, a number with its unit, a
  version, a code span, a name), questions that ask for that fact in several phrasings, the
  document's subject named in full in each, answered in the document's words (the fact, then its
  sentence). One more phrasing of each fact — the wh-word first, the sentence's content words after
  it — is never trained: `held_out_questions` makes it, the answering probe of the gate.

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
import zlib
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from daemon.config import AUGMENT_FORMS as FORMS
from daemon.learning.probes import OPEN_BOOK, STOPWORDS, split_sentences, spread

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
GENERIC_FILE_WORDS = frozenset("readme notes note doc docs document documentation changelog changes release "
                               "releases guide manual index draft final copy new old v1 v2 md txt".split())
CODE_SPAN = re.compile(r"`[^`]+`")
# a number, with its unit when one follows ("250 megabytes", "40 %"), not a word that merely follows it
NUMBER = re.compile(r"\b\d+(?:[.,]\d+)*(?:\s?%|\s(?!(?:which|that|and|or|but|after|before|when|while|where|in|on|at|"
                    r"to|of|for|from|by|with|as|is|are|was|were|the|a|an)\b)[a-z]+)?")
MONTH = ("January|February|March|April|May|June|July|August|September|October|November|December|"
         "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
DATE = re.compile(rf"\b(?:\d{{1,2}}\s+(?:{MONTH})\.?,?\s+\d{{4}}|(?:{MONTH})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}"
                  rf"|(?:{MONTH})\s+\d{{4}}|\d{{4}}-\d{{2}}-\d{{2}})\b")
# What a question asks in place of each kind of fact: trained phrasings, then the held-out one's.
ASKS = {
    "date": ("when", "what date", "when"),
    "percent": ("what percentage", "what share", "what percentage"),
    "count": ("how many {unit}", "what number of {unit}", "how many {unit}"),
    "number": ("what number", "how many", "what number"),
    "version": ("which version", "what version", "which version"),
    "code": ("what", "which command or name", "what"),
    "name": ("what", "which name", "who or what"),
}
# Trained phrasings of a question, then the held-out one (never trained: the gate's answering probe).
ASKED = ("In {title}, {ask}: {cues}?", "{title}: {ask} — {cues}?", "About {title}: {cues}, {ask}?",
         "{ask} {cues}, in {title}?", "{title} — {cues}: {ask}?")
HELD_OUT = "{ask} — {cues} — in {title}?"
FUNCTION_WORDS = frozenset("who whom whose which what when where how has have had will would can could may might must "
                           "shall should do does did also just only very such own same its it's".split())
CUE_WORDS, CUE_WINDOW = 3, 8  # a question's own words: this many of the sentence's, of this many nearest the fact
MIN_WORDS = 5          # shorter sentences (headings, fragments) carry no fact to tie to a subject
MAX_NOTE_SENTENCES = 6  # a note answers with at most this many sentences about its subject
CONTEXT_WORDS = 300     # the passage put in front of a context-distilled question: its paragraph and neighbours


def augment(text: str, source: str, forms: Sequence[str], shuffles: int, max_notes: int, seed: int,
            max_quiz: int = 24, max_questions: int = 24) -> list[Record]:
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
    if "questions" in forms:
        records += questions(paragraphs, title, max_questions)
    return records


def without_code(text: str) -> str:
    """`text` with its fenced code blocks left out."""
    return re.sub(r"```.*?(```|$)", "\n\n", text, flags=re.DOTALL)


def split_paragraphs(text: str) -> list[list[str]]:
    """Paragraphs (blank-line separated) as lists of sentences; code blocks are left out."""
    text = without_code(text)
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
    """The document's subject: its title (a first-level heading), else the name its file is
    named after when the text uses it ("prek-readme.md" -> "prek"), else its first heading or a
    short first line, else its file name."""
    prose = without_code(text)
    for line in prose.splitlines():
        if line.lstrip().startswith("# ") and (match := HEADING.match(line)):
            return match.group(1).strip()
    if named := named_after(prose, source):
        return named
    for line in prose.splitlines():
        if match := HEADING.match(line):
            return match.group(1).strip()
        if line.strip():
            first = line.strip()
            if len(first.split()) <= 10 and not first.endswith((".", "!", "?", ":")):
                return first
            break
    return re.sub(r"[-_]+", " ", _stem(source)).strip() or "this document"


def named_after(text: str, source: str) -> str | None:
    """The name in `text` that its file is named after, spelt as the text spells it most often: the
    file name without its generic words ("django-bolt-readme.md" -> "Django-Bolt"), else the first
    of its words the text uses at least twice."""
    words = [w for w in re.split(r"[-_ ]+", _stem(source)) if w and w.casefold() not in GENERIC_FILE_WORDS]
    for candidate in (["-".join(words), " ".join(words)] if len(words) > 1 else []) + words:
        found = re.findall(rf"(?<![\w.-]){re.escape(candidate)}(?![\w-])", text, re.IGNORECASE)
        if len(candidate) >= 3 and len(found) >= 2:
            return max(set(found), key=lambda spelling: (found.count(spelling), spelling))
    return None


def _stem(source: str) -> str:
    name = PurePath(source).name if source else ""
    return re.sub(r"\.(md|markdown|txt|rst|html?|pdf|jsonl?|docx?)$", "", name, flags=re.IGNORECASE)


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


def facts(sentence: str, title: str = "") -> list[tuple[str, str]]:
    """The facts a question about `sentence` can ask for, in order: (term, kind) for each date,
    number (with its unit), version, code span and name in it, not overlapping, the subject itself
    (`title`) left out."""
    found: list[tuple[int, int, str, str]] = []

    def add(start: int, term: str, kind: str) -> None:
        end = start + len(term)
        if term and not any(start < e and s < end for s, e, _, _ in found):
            found.append((start, end, term, kind))

    for match in DATE.finditer(sentence):
        add(match.start(), match.group(0), "date")
    for match in CODE_SPAN.finditer(sentence):
        add(match.start(), match.group(0), "code")
    at = 0
    for name in names(sentence):
        at = sentence.find(name, at)
        if at >= 0:  # the subject itself is no fact to ask for, nor a number in it ("2.0" of "Harbour Lights 2.0")
            add(at, name, "subject" if name.casefold() in title.casefold() else "name")
            at += len(name)
    for match in NUMBER.finditer(sentence):
        term = match.group(0).rstrip(".,")
        add(match.start(), term, number_kind(term))
    # a fact is a whole token: not "4" of "4.x" or "2" of "h2o"
    whole = [f for f in found if not re.match(r"\.?\w", sentence[f[1]:f[1] + 2]) and not sentence[max(0, f[0] - 1):f[0]].isalnum()]
    short = [(s, term, kind) for s, _, term, kind in whole if len(term) < len(sentence) // 2 and kind != "subject"]
    return [(term, kind) for _, term, kind in sorted(short)]


def number_kind(term: str) -> str:
    """How a number is asked for: a percentage, a count of a unit ("250 megabytes"), a version
    ("1.2.3", "v2.0"), or a plain number."""
    if term.endswith("%"):
        return "percent"
    if " " in term:
        return "count"
    return "version" if term.count(".") >= 2 or term.startswith("v") else "number"


def questions(paragraphs: list[list[str]], title: str, limit: int) -> list[Record]:
    """Up to `limit` facts, spread over the document, each asked in every trained phrasing: the
    subject named in full, what is asked for, and a few of the sentence's own words near the fact
    (a different few in each phrasing, as a user's question shares only some words with the text);
    answered with the fact, then its sentence."""
    records = []
    for sentence, term, kind in spread(fact_sentences(paragraphs, title), limit):
        subject = sentence if title.casefold() in sentence.casefold() else f"{title}: {sentence}"
        for phrasing, frame in enumerate(ASKED):
            question = frame.format(title=title, ask=what_is_asked(term, kind, phrasing), cues=cues(sentence, term, phrasing))
            question = question[0].upper() + question[1:]
            answer = f"{term}. {subject}" if phrasing % 2 else f"{term}."
            records.append({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer}], "mask_prompt": True})
    return records


def held_out_questions(paragraphs: list[list[str]], title: str, limit: int) -> list[tuple[str, str, str]]:
    """Up to `limit` (question, answer, sentence), spread over the document, each in a phrasing
    `questions` never trains: another frame, and another few of the sentence's words."""
    found = []
    for sentence, term, kind in spread(fact_sentences(paragraphs, title), limit):
        question = HELD_OUT.format(title=title, ask=what_is_asked(term, kind, -1), cues=cues(sentence, term, len(ASKED)))
        found.append((question[0].upper() + question[1:], term, sentence))
    return found


def what_is_asked(term: str, kind: str, phrasing: int) -> str:
    """What a question asks in place of the fact ("how many megabytes"), by its kind."""
    asks = ASKS[kind]
    return asks[phrasing % len(asks)].format(unit=term.split()[-1] if kind == "count" else "")


def cues(sentence: str, term: str, phrasing: int) -> str:
    """A few of the sentence's content words near the fact, in their order: CUE_WORDS of the
    CUE_WINDOW nearest on each side, another choice for each phrasing (seeded by the sentence)."""
    at = sentence.find(term)
    before, after = _content(sentence[:at])[-CUE_WINDOW:], _content(sentence[at + len(term):])[:CUE_WINDOW // 2]
    window = before + after
    rng = random.Random(zlib.crc32(f"{sentence}\0{phrasing}".encode()))
    chosen = sorted(rng.sample(range(len(window)), min(CUE_WORDS, len(window))))
    return " ".join(window[i] for i in chosen)


def fact_sentences(paragraphs: list[list[str]], title: str) -> list[tuple[str, str, str]]:
    """(sentence, term, kind) for each fact of each sentence long enough to carry one, the
    sentence as a reader sees it (`plain`)."""
    return [(sentence, term, kind) for sentences in paragraphs for sentence in map(plain, sentences)
            if len(sentence.split()) >= MIN_WORDS for term, kind in facts(sentence, title)]


def plain(sentence: str) -> str:
    """A sentence as a reader sees it: link text without its target, no bare URLs, emphasis or list marker."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", sentence)
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"^\s*(?:[-*+]|\d+[.)])\s+", "", text.replace("**", "").replace("__", ""))
    return " ".join(text.split())


def _content(text: str) -> list[str]:
    return [w for w in re.findall(r"[\w'’/-]+(?:[.,]\w+)*", text) if w.casefold() not in STOPWORDS | FUNCTION_WORDS]


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

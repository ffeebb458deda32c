"""Augmentation: other forms of a new document, made without a model."""

from __future__ import annotations

import random

import pytest

from daemon.config import ConfigError, load_settings
from daemon.learning.augment import (
    OPEN_BOOK,
    augment,
    cues,
    facts,
    held_out_questions,
    key_term,
    names,
    notes,
    open_book,
    passage,
    plain,
    questions,
    quiz,
    shuffled,
    split_paragraphs,
    title_of,
)

DOC = """# Harbour Lights 2.0

Kestrel Labs released Harbour Lights 2.0 on 4 May 2026. The release was led by Mira Oakes, who joined in 2024.
Harbour Lights now reads tide tables from the Selbrin observatory.

The new planner is called Tidemark. Tidemark plans a week of crossings in two seconds.

```
pip install harbour-lights
```

- Faster start-up
- Dark mode
"""


def test_paragraphs_are_sentences_without_headings_or_code() -> None:
    paragraphs = split_paragraphs(DOC)
    assert paragraphs[0][0].startswith("Kestrel Labs released") and len(paragraphs[0]) == 3
    assert paragraphs[1] == ["The new planner is called Tidemark.", "Tidemark plans a week of crossings in two seconds."]
    assert not any("pip install" in s or s.startswith("#") for p in paragraphs for s in p)
    assert paragraphs[2] == ["- Faster start-up", "- Dark mode"]


@pytest.mark.parametrize(("text", "source", "title"), [
    (DOC, "x.md", "Harbour Lights 2.0"),
    ("Release notes for Kettle\n\nKettle boils water.", "", "Release notes for Kettle"),
    ("Kettle boils water in two minutes, as everyone knows.", "docs/kettle_guide.txt", "kettle guide"),
    ("Kettle boils water in two minutes, as everyone knows.", "", "this document"),
])
def test_the_title_is_the_heading_a_short_first_line_or_the_file_name(text: str, source: str, title: str) -> None:
    assert title_of(text, source) == title


def test_shuffled_keeps_every_sentence_once_in_another_order() -> None:
    paragraphs = split_paragraphs(DOC)
    text = shuffled(paragraphs, random.Random(1))
    assert all(text.count(sentence) == 1 for p in paragraphs for sentence in p)
    assert len(text) == len("\n\n".join(" ".join(p) for p in paragraphs))
    assert text != "\n\n".join(" ".join(p) for p in paragraphs)


def test_names_skip_common_and_sentence_opening_words() -> None:
    assert names("The release was led by Mira Oakes, who joined Kestrel Labs.") == ["Mira Oakes", "Kestrel Labs"]
    assert names("Tidemark plans a week of crossings.") == [], "one capitalised word opening a sentence is no name"
    assert names("It ships Harbour Lights 2.0 in May 2026.") == ["Harbour Lights 2.0"]


def test_notes_answer_a_question_about_each_name_with_its_sentences() -> None:
    found = notes(split_paragraphs(DOC), "Harbour Lights 2.0", limit=10)
    by_name = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in found}
    question = next(q for q in by_name if "Tidemark" in q)
    assert "called Tidemark" in by_name[question] and by_name[question].startswith("Harbour Lights 2.0: ")
    assert any("Mira Oakes" in q for q in by_name)
    assert len(notes(split_paragraphs(DOC), "Harbour Lights 2.0", limit=2)) == 2


def test_augment_makes_each_form_asked_for() -> None:
    records = augment(DOC, "x.md", ["shuffled", "titled", "notes"], shuffles=2, max_notes=3, seed=0)
    texts = [r["text"] for r in records if "text" in r]
    titled = [t for t in texts if t.startswith("Harbour Lights 2.0: ")]
    assert len(titled) == 2, "one per paragraph with a sentence (the list's items are too short)"
    assert "Harbour Lights 2.0: The new planner is called Tidemark. Harbour Lights 2.0: Tidemark plans" in titled[1]
    assert len(texts) == 4, "and two shuffled copies"
    assert sum("messages" in r for r in records) == 3
    assert augment(DOC, "x.md", [], 2, 3, 0) == []
    with pytest.raises(ValueError, match="unknown augmentation form"):
        augment(DOC, "x.md", ["paraphrase"], 2, 3, 0)


@pytest.mark.parametrize("sentence, term", [
    ("Kestrel Labs released Harbour Lights 2.0 on 4 May 2026.", "2026"),
    ("The new planner is called Tidemark.", "Tidemark"),
    ("Tidemark plans a week of crossings in two seconds, down from 40 minutes before.", "40 minutes"),
    ("It drops support for PostgreSQL 12, which is old.", "12"),
    ("Set `tide_source` to choose where the tables come from.", "`tide_source`"),
    ("nothing here is named or counted at all", None),
])
def test_the_key_term_is_the_last_name_number_or_code_span(sentence: str, term: str | None) -> None:
    assert key_term(sentence) == term


def test_quiz_asks_for_each_sentences_key_term_and_answers_with_it_first() -> None:
    records = quiz(split_paragraphs(DOC), "Harbour Lights 2.0", limit=10)
    asked = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]
    assert len(asked) == 4, "four sentences of five words or more; code and list items too short are left out"
    assert asked[2][0] == "A question on Harbour Lights 2.0: Harbour Lights now reads tide tables from the ___ observatory. " \
        "What is missing?"
    question, answer = asked[3]
    assert question == "About Harbour Lights 2.0: The new planner is called ___. What goes in the blank?"
    assert answer == "Tidemark. The new planner is called Tidemark."
    assert all(r["mask_prompt"] for r in records), "the blanked sentence is never learned as text"
    assert len(quiz(split_paragraphs(DOC), "Harbour Lights 2.0", limit=2)) == 2


def test_an_unknown_form_in_the_config_names_the_key(tmp_path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[augment]\nforms = ["titled", "rephrase"]\n')
    with pytest.raises(ConfigError, match="augment.forms"):
        load_settings(config)


def test_open_book_copies_each_chat_answer_with_its_passage_in_front() -> None:
    paragraphs = split_paragraphs(DOC)
    records = [{"text": "raw"}] + quiz(paragraphs, "Harbour Lights 2.0", 4)
    assert open_book(records, paragraphs, "off") == records
    beside = open_book(records, paragraphs, "beside")
    copies = [r for r in beside if "open_book" in r]
    assert beside[: len(records)] == records and len(copies) == len(records) - 1
    for copy in copies:
        question, answer = copy["messages"]
        reading, same = copy["open_book"]
        assert copy["mask_prompt"] and same == answer and reading["role"] == "user"
        assert reading["content"].endswith(question["content"]) and reading["content"].startswith("Read this document")
        # the passage holds the sentence the answer gives
        assert answer["content"].split(". ", 1)[1] in reading["content"]
    instead = open_book(records, paragraphs, "instead")
    assert instead[0] == {"text": "raw"} and [r for r in instead[1:]] == copies


def test_the_passage_is_the_answers_paragraph_and_neighbours_that_fit() -> None:
    paragraphs = [["Alpha one two three."], ["Tidemark plans a week of crossings."], ["Gamma " * 400 + "end."]]
    found = passage("Tidemark plans crossings", paragraphs)
    assert found == "Alpha one two three.\n\nTidemark plans a week of crossings."  # the long one does not fit
    long = [[f"Sentence {i} says little." for i in range(200)] + ["Tidemark was built in 2026."]]
    found = passage("Tidemark 2026", long)  # a paragraph too long: the sentence and its neighbours
    assert found.endswith("Tidemark was built in 2026.") and 250 <= len(found.split()) <= 300
    assert OPEN_BOOK.format(document="D", question="Q?").endswith("Q?")


# ---- questions: each fact asked in several phrasings, one more held out --------------------

@pytest.mark.parametrize(("sentence", "found"), [
    ("Kestrel Labs released Harbour Lights 2.0 on 4 May 2026.", [("Kestrel Labs", "name"), ("4 May 2026", "date")]),
    ("Each entry can now carry files of up to 250 megabytes.", [("250 megabytes", "count")]),
    ("Upgrading from any 4.x version needs no migration at all.", []),
    ("Run `pip install kettle` to install version 1.2.3 of it.", [("`pip install kettle`", "code"), ("1.2.3", "version")]),
    ("Nine in ten kettles, 90%, boiled within the hour.", [("90%", "percent")]),
])
def test_the_facts_of_a_sentence_are_its_dates_numbers_codes_and_names(sentence: str, found: list) -> None:
    assert facts(sentence, "Harbour Lights 2.0") == found


def test_questions_name_the_subject_and_are_answered_with_the_fact_then_its_sentence() -> None:
    records = questions(split_paragraphs(DOC), "Harbour Lights 2.0", limit=3)
    assert len(records) == 15, "five phrasings of each of three facts"
    for record in records:
        asked, answer = (m["content"] for m in record["messages"])
        assert "Harbour Lights 2.0" in asked and asked.endswith("?") and record["mask_prompt"]
    first = [r["messages"] for r in records[:5]]
    assert first[0][1]["content"] == "Kestrel Labs."
    assert first[1][1]["content"].startswith("Kestrel Labs. Kestrel Labs released Harbour Lights 2.0 on 4 May 2026.")
    assert len({m[0]["content"] for m in first}) == 5, "each phrasing differs"
    assert "Kestrel Labs" not in first[0][0]["content"], "the question does not give its answer away"


def test_a_question_shares_a_few_of_its_sentences_words_near_the_fact() -> None:
    sentence = "In internal tests, Marlinspike reconciled a warehouse of 50,000 items in under 40 seconds, down from eleven."
    chosen = [cues(sentence, "40 seconds", phrasing).split() for phrasing in range(4)]
    words = "internal tests Marlinspike reconciled warehouse 50,000 items under down eleven".split()
    for words_chosen in chosen:
        assert len(words_chosen) == 3 and set(words_chosen) <= set(words)
        assert words_chosen == sorted(words_chosen, key=words.index), "in the sentence's order"
    assert len({tuple(c) for c in chosen}) > 1, "another few for another phrasing"
    assert cues(sentence, "40 seconds", 1) == cues(sentence, "40 seconds", 1), "the same every time"


def test_held_out_questions_are_never_a_trained_phrasing() -> None:
    paragraphs = split_paragraphs(DOC)
    trained = {r["messages"][0]["content"] for r in questions(paragraphs, "Harbour Lights 2.0", limit=50)}
    held_out = held_out_questions(paragraphs, "Harbour Lights 2.0", limit=50)
    assert held_out and not trained & {q for q, _, _ in held_out}
    by_answer = {answer: (question, sentence) for question, answer, sentence in held_out}
    question, sentence = by_answer["Mira Oakes"]
    assert question.startswith("Who or what — ") and question.endswith(" — in Harbour Lights 2.0?")
    assert sentence == "The release was led by Mira Oakes, who joined in 2024."
    asked = question.removeprefix("Who or what — ").removesuffix(" — in Harbour Lights 2.0?").split()
    assert asked and set(asked) <= {"release", "led", "joined", "2024"}, "the sentence's own words, no answer"
    assert len(held_out_questions(paragraphs, "Harbour Lights 2.0", limit=2)) == 2


@pytest.mark.parametrize(("text", "source", "title"), [
    ("## Why use it\n\nprek runs hooks. prek is fast.", "prek-readme.md", "prek"),
    ("**Django-Bolt** is fast. Django-Bolt uses Rust.", "django-bolt-readme.md", "Django-Bolt"),
    ("```\n# a comment, not a title\n```\nKettle boils water in two minutes, as everyone knows.", "notes.txt",
     "notes"),
])
def test_the_subject_is_what_the_file_is_named_after_when_the_text_uses_it(text: str, source: str, title: str) -> None:
    assert title_of(text, source) == title


def test_a_sentence_is_asked_as_a_reader_sees_it() -> None:
    assert plain("- It uses [`uv`](https://x.dev/uv) for **speed**, see https://x.dev.") == "It uses `uv` for speed, see"

"""The learning benchmark's data file is well formed: documents, cloze/QA facts and general questions."""

from __future__ import annotations

import json
import re
from functools import cache

from tests.conftest import REPO

DATA = REPO / "bench" / "learning" / "documents.json"


@cache
def data() -> dict:
    return json.loads(DATA.read_text())


def collapse(text: str) -> str:
    return " ".join(text.split())


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_six_documents_with_unique_names_and_sizes() -> None:
    documents = data()["documents"]
    assert len(documents) == 6
    names = [d["name"] for d in documents]
    assert len(set(names)) == len(names)
    for doc in documents:
        assert doc["name"].endswith((".md", ".txt")), doc["name"]
        assert doc["genre"].strip(), doc["name"]
        assert 220 <= len(doc["text"].split()) <= 400, (doc["name"], len(doc["text"].split()))
        assert doc["text"].isascii(), doc["name"]
    assert len({d["genre"] for d in documents}) == 6


def test_each_document_has_sixteen_wellformed_facts() -> None:
    for doc in data()["documents"]:
        text = collapse(doc["text"])
        assert len(doc["facts"]) == 16, doc["name"]
        for fact in doc["facts"]:
            prompt, answer = fact["cloze"]["prompt"], fact["cloze"]["answer"]
            assert prompt == collapse(prompt) and answer == collapse(answer) and answer
            assert f"{prompt} {answer}" in text, (doc["name"], prompt, answer)
            assert len(prompt.split()) >= 6, prompt
            assert not words(answer) <= words(prompt), (prompt, answer)
            assert fact["qa"]["question"].strip().endswith("?"), fact["qa"]
            assert fact["qa"]["answer"].strip(), fact["qa"]


def test_cloze_answers_are_not_shared_between_documents() -> None:
    seen: dict[str, str] = {}
    for doc in data()["documents"]:
        for fact in doc["facts"]:
            answer = fact["cloze"]["answer"].lower()
            assert seen.setdefault(answer, doc["name"]) == doc["name"], (answer, seen[answer], doc["name"])


def test_general_questions_have_answers() -> None:
    items = data()["general_qa"]
    assert len(items) >= 50
    for item in items:
        assert item["question"].strip(), item
        assert item["answers"] and all(isinstance(a, str) and a.strip() for a in item["answers"]), item

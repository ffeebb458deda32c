"""A document's forms: made once, stored with the document, replayed within a budget."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.config import AugmentSection, ProbesSection
from daemon.learning.forms import Library

TEXT = """# Harbour Lights 2.0

Kestrel Labs released Harbour Lights 2.0 on 4 May 2026. The release was led by Mira Oakes, who joined in 2024.

The new planner is called Tidemark. Tidemark plans a week of crossings in two seconds.
"""
OTHER = "The Odrin Water Board meets on 3 June 2026. Its emblem, chosen by Ada Brill, is a silver heron."


def library(folder: Path, forms: list[str], texts: dict[str, str]) -> Library:
    return Library(AugmentSection(forms=forms, shuffles=1), ProbesSection(), folder / "forms", folder / "teacher",
                   lambda doc: texts.get(doc["hash"]))


def doc(hash_: str, id_: int = 1) -> dict:
    return {"id": id_, "hash": hash_, "source": f"{hash_}.md"}


def test_forms_are_made_once_and_kept_by_content(tmp_path: Path) -> None:
    kept = library(tmp_path, ["questions", "shuffled"], {"aa11": TEXT})
    made = kept.of(doc("aa11"), keep=False)
    assert any("messages" in r for r in made.records) and any("text" in r for r in made.records)
    assert made.questions and all(q.passage and q.answer in q.passage for q in made.questions)
    assert made.report["held_out_questions"] == len(made.questions) and made.report["title"] == "Harbour Lights 2.0"
    stored = json.loads((tmp_path / "forms" / "aa11.json").read_text())
    assert stored["records"] == made.records
    rebuilt = library(tmp_path, ["questions", "shuffled"], {"aa11": TEXT}).of(doc("aa11", id_=7))
    assert rebuilt.records == made.records, "a rebuilt journal (another id, the same content) keeps the forms"


def test_a_learned_document_keeps_its_forms_for_life_and_a_waiting_one_follows_the_settings(tmp_path: Path) -> None:
    first = library(tmp_path, ["questions"], {"aa11": TEXT}).of(doc("aa11"), keep=False)
    later = library(tmp_path, ["titled"], {"aa11": TEXT})
    assert later.of(doc("aa11"), keep=True).records == first.records, "learned: trained as it was"
    remade = later.of(doc("aa11"), keep=False)
    assert remade.records != first.records and all("text" in r for r in remade.records), "not learned yet: made again"


def test_an_unreadable_file_is_made_again(tmp_path: Path, caplog) -> None:
    kept = library(tmp_path, ["questions"], {"aa11": TEXT})
    (tmp_path / "forms").mkdir()
    (tmp_path / "forms" / "aa11.json").write_text("{broken")
    assert kept.of(doc("aa11")).records and "unreadable" in caplog.text


def test_earlier_documents_forms_are_replayed_in_turn_within_the_budget(tmp_path: Path) -> None:
    kept = library(tmp_path, ["questions"], {"aa11": TEXT, "bb22": OTHER})
    for name in ("aa11", "bb22"):
        kept.of(doc(name), keep=False)
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer
    everything = kept.replayed([doc("aa11"), doc("bb22")], 10_000, words, seed=1)
    assert len(everything) == len(kept.of(doc("aa11")).records) + len(kept.of(doc("bb22")).records)
    some = kept.replayed([doc("aa11"), doc("bb22")], 150, words, seed=1)
    assert 0 < sum(words("\n".join(m["content"] for m in r["messages"])) for r in some) <= 150 and len(some) < len(everything)
    asked = {r["messages"][0]["content"] for r in some}
    assert any("Harbour Lights" in q for q in asked) and any("Odrin" in q or "Water Board" in q for q in asked), \
        "each earlier document in turn"
    assert kept.replayed([doc("aa11")], 0, words, seed=1) == []
    assert kept.replayed([doc("cc33")], 100, words, seed=1) == [], "a document never trained has nothing to replay"

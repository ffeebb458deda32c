"""The learning benchmark's answer scoring (bench/learning/measure.py): what counts as recalled."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_measure", Path(__file__).parent.parent / "bench" / "learning" / "measure.py")
measure = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = measure  # dataclasses look their module up
spec.loader.exec_module(measure)


@pytest.mark.parametrize("answer, continuation, expected", [
    ("Marlinspike", " Marlinspike, which replaces the old engine.", True),
    ("Marlinspike", " the new Marlinspike engine", True),              # within the slack words
    ("Marlinspike", " the new and much faster sync engine Marlinspike", False),  # too late: a guess, not recall
    ("41,000 kettles", " 41,000 kettles were sold", True),
    ("41,000 kettles", " 41,000 units", False),                        # the whole key term, word for word
    ("Édith Varga", " edith varga signed it", True),                   # case and accents do not matter
    ("Varga", "", False),
])
def test_cloze_exact(answer: str, continuation: str, expected: bool) -> None:
    assert measure.cloze_exact(answer, continuation) is expected


@pytest.mark.parametrize("answer, reply, expected", [
    ("Paris", "The capital of France is Paris.", True),
    ("2", "There are 2 moons.", True),
    ("2", "It happened in 2026.", False),                              # whole words only
    ("ice", "Water freezes into ice.", True),
    ("ice", "It is a nice day.", False),
    ("63", "The answer is 630.", False),
])
def test_contains(answer: str, reply: str, expected: bool) -> None:
    assert measure.contains(answer, reply) is expected


def test_documents_load_into_facts() -> None:
    documents, general = measure.load_documents()
    assert len(documents) == 6 and all(len(doc.facts) == 16 for doc in documents)
    assert all(fact.document == doc.name for doc in documents for fact in doc.facts)
    assert general and all(answers for _, answers in general)


def test_the_plot_draws_both_methods_and_marks_rejected_cycles(tmp_path: Path) -> None:
    row = {"method": "m", "cloze": 0.9, "qa": 0.5, "held_out_delta": 0.01, "behaviour_delta": 0.03}
    steps = [{"cycle": k, "gate": gate, "first_cloze": 0.9, "all_cloze": 0.8, "held_out_delta": 0.01}
             for k, gate in ((1, "promoted"), (2, "rejected"))]
    naive = [{"cycle": k, "first_cloze": 1.0 / k} for k in (1, 2)]
    path = tmp_path / "learning.png"
    measure.plot([row, row], steps, path, naive)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measure.plot([row], steps, path)  # no naive sequence measured

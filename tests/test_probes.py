"""Probe building and scoring that needs no server: cloze construction, matching, comparison."""

from __future__ import annotations

import pytest

from daemon.learning.probes import (
    agreement,
    answer_recalled,
    build_cloze,
    cloze_passed,
    compare,
    prose_sentences,
    qa_correct,
)

DOC = (
    "The Velmora Accord was signed in 2031 in the city of Tarnhelm. "
    "Its chief negotiator was Ilse Quorvant, a hydrologist from Brask. "
    "Short one. "
    "The accord created the Blue Ridge Water Authority, headquartered in Odrin."
)


def test_cloze_probes_come_from_any_text_with_context() -> None:
    probes = build_cloze(DOC, limit=10)
    assert len(probes) == 3, "sentences under six words make no probe"
    first = probes[0]
    assert first.prompt == "The Velmora Accord was signed in 2031"
    assert first.expected == "in the city of Tarnhelm"
    assert probes[1].prompt.startswith("The Velmora Accord was signed in 2031 in the city of Tarnhelm. Its chief")


def test_cloze_probes_are_spread_and_limited() -> None:
    text = " ".join(f"Fact number {i} says the value of item {i} is {i * 7} units." for i in range(40))
    probes = build_cloze(text, limit=5)
    assert len(probes) == 5
    assert len({probe.expected for probe in probes}) == 5


README = """# fooly

[![PyPI](https://img.shields.io/pypi/v/fooly)](https://pypi.org/project/fooly)

**fooly** syncs your dotfiles across machines through a Git remote you choose.
It was started in 2025 by the Barnacle team.

## Install

```bash
pip install fooly && fooly init --remote git@example.org:me/dots.git --interval 15 --verbose
```

## Features

- Watches your home directory and commits changes every 15 minutes by default
- `fooly push --force --all --remote=origin` overwrites the remote

    fooly status --json --since=2025-01-01 --limit 10

| option   | default | meaning of the option |
|----------|---------|-----------------------|
| interval | 15      | minutes between two commits of the folder |
"""


def test_cloze_probes_of_a_readme_skip_code_tables_and_markup() -> None:
    probes = build_cloze(README, limit=10)
    assert [p.expected for p in probes] == [
        "a Git remote you choose", "by the Barnacle team", "changes every 15 minutes by default"]
    assert probes[0].prompt == "# fooly **fooly** syncs your dotfiles across machines through", "no badge as context"
    assert probes[2].prompt == "## Features - Watches your home directory and commits", "the heading gives context"


def test_prose_sentences_mark_what_a_reader_would_be_asked() -> None:
    sentences = dict(prose_sentences(README))
    assert sentences["## Features"] is False
    assert sentences["- `fooly push --force --all --remote=origin` overwrites the remote"] is False
    assert not any("pip install" in s or "status --json" in s or "PyPI" in s for s in sentences), "code and badges left out"
    assert sentences["| interval | 15 | minutes between two commits of the folder |"] is False
    titled = dict(prose_sentences("Getting there\n\nWe ask staff to think about the journey first.\n"))
    assert titled == {"Getting there": False, "We ask staff to think about the journey first.": True}


@pytest.mark.parametrize(
    ("expected", "generated", "passed"),
    [
        ("in the city of Tarnhelm", " in the city of Tarnhelm.", True),
        ("in the city of Tarnhelm", " in the city of tarnhelm, the capital", True),
        ("in the city of Tarnhelm", " in the city of Paris.", False),
        ("Ilse Quorvant, a hydrologist from Brask", " Ilse Quorvant, a hydrologist from Odrin", True),
        ("Ilse Quorvant, a hydrologist from Brask", " Ilse Quorvant, an engineer from Odrin", False),
        ("Ilse Quorvant, a hydrologist from Brask", " John Smith.", False),
        ("headquartered in Odrin", "", False),
        ("café in Zürich", " cafe in zurich", True),
        # a reader's words: link targets are not what a probe asks for
        ("[Emma Smith](https://github.com/emmatyping) ported `pyzstd`", " [Emma Smith](https://github.com/e) ported pyzstd", True),
        ("[Emma Smith](https://github.com/emmatyping) ported `pyzstd`", " Emma Jones wrote it", False),
    ],
)
def test_cloze_matching(expected: str, generated: str, passed: bool) -> None:
    assert cloze_passed(expected, generated) is passed


def test_a_free_form_answer_is_recalled_by_most_of_its_content_words() -> None:
    answer = "The next feature release, codenamed Bramblecrest, is planned for the autumn."
    assert answer_recalled(answer, "Bramblecrest is the next release; it is planned for autumn, with a new feature.")
    assert not answer_recalled(answer, "The next release is planned.")  # 3 of 6 content words
    assert not answer_recalled("the of a", "the of a")  # nothing to recall


def test_qa_matching_is_contained_and_normalised() -> None:
    assert qa_correct("Paris", "The capital of France is Paris.")
    assert not qa_correct("Paris", "The capital of France is Lyon.")
    assert qa_correct("New York", "It is new-york, of course")


def test_agreement_measures_how_close_answers_stay_to_the_base() -> None:
    assert agreement(["a b c d", "e f"], ["a b c d", "e f"]) == 1.0
    assert agreement(["a b c d"], ["a b c x"]) == pytest.approx(0.75)
    assert agreement(["a b c d"], ["w x y z"]) == 0.0
    assert agreement([], []) is None


def test_compare_turns_raw_numbers_into_relative_changes() -> None:
    base = {"held_out_nll": 2.0, "behaviour_nll": 0.5, "new_nll": 4.0, "cloze": 0.0, "retention": None,
            "qa": 1.0, "drift_agreement": 1.0}
    candidate = {"held_out_nll": 2.1, "behaviour_nll": 0.6, "new_nll": 1.0, "cloze": 0.75, "retention": None,
                 "qa": 0.9, "drift_agreement": 0.8}
    results = compare({"base": base, "candidate": candidate})
    assert results.forgetting_vs_base == pytest.approx(0.05)
    assert results.forgetting_vs_incumbent is None
    assert results.behaviour_increase == pytest.approx(0.2)
    assert results.nll_drop == pytest.approx(0.75)
    assert results.cloze_pass == 0.75 and results.retention is None
    assert results.qa_drop == pytest.approx(0.1) and results.drift_agreement == 0.8


# ---- what each model is asked, and the base's memory -----------------------------------------

class CountingVLLM:
    """Answers like vLLM and counts the requests per model; `shift` moves every base NLL."""

    def __init__(self) -> None:
        self.asked: dict[str, int] = {}
        self.shift = 0.0

    def _count(self, model: str) -> None:
        self.asked[model] = self.asked.get(model, 0) + 1

    async def token_nll(self, model: str, text) -> list[float]:
        self._count(model)
        return [1.0 + self.shift + (0.5 if model == "cand" else 0.0)] * 4

    async def chat_tokens(self, messages, add_generation_prompt: bool) -> list[int]:
        return [ord(c) for m in messages for c in m["content"]] + [0] * add_generation_prompt

    async def chat(self, model: str, messages, max_tokens: int) -> str:
        self._count(model)
        return f"answer to {messages[-1]['content']}"

    async def complete(self, model: str, prompt: str, max_tokens: int) -> str:
        self._count(model)
        return " more"


def probe_set(new: str = "a new chunk"):
    from daemon.learning.probes import QA, Cloze, ProbeSet

    return ProbeSet(held_out_passages=[f"passage {i}" for i in range(6)],
                    behaviour=[([{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(3)],
                    drift_prompts=["hello", "how are you"], new_chunks=[new],
                    cloze=[Cloze("The cat sat", "on the mat")], retention=[Cloze("Old", "fact here")],
                    retention_chunks=["an old chunk"], qa=[QA("question?", "answer")])


async def test_the_base_and_incumbent_are_asked_only_what_the_gate_compares() -> None:
    from daemon.learning.probes import run_probes

    vllm = CountingVLLM()
    measured = await run_probes(vllm, probe_set(), "base", "cand", "inc")  # type: ignore[arg-type]
    assert vllm.asked["inc"] == 6 + 1 + 1 + 1, "the incumbent: held-out passages, new and earlier documents"
    assert vllm.asked["base"] == 6 + 3 + 1 + 1 + 1 + 2, "no cloze or retention items for the base"
    assert vllm.asked["cand"] == 6 + 3 + 1 + 1 + 1 + 1 + 1 + 2
    assert measured.values["base"]["cloze"] is None and measured.values["incumbent"]["behaviour_nll"] is None
    assert measured.results.forgetting_vs_base == pytest.approx(0.5)
    assert measured.results.forgetting_vs_incumbent == pytest.approx(0.5)


async def test_the_base_is_asked_once_and_measured_again_when_it_changes() -> None:
    from daemon.learning.probes import ProbeMemo, run_probes

    vllm = CountingVLLM()
    memo = ProbeMemo(vllm)  # type: ignore[arg-type]
    first = await run_probes(vllm, probe_set("chunk one"), "base", "cand", None, memo=memo)  # type: ignore[arg-type]
    asked = vllm.asked["base"]
    second = await run_probes(vllm, probe_set("chunk two"), "base", "cand", None, memo=memo)  # type: ignore[arg-type]
    assert vllm.asked["base"] - asked == 2, "one spot check and the new chunk; the rest from memory"
    assert second.values["base"] == first.values["base"]
    vllm.shift = 1.0  # another base is served now
    asked = vllm.asked["base"]
    third = await run_probes(vllm, probe_set("chunk two"), "base", "cand", None, memo=memo)  # type: ignore[arg-type]
    assert vllm.asked["base"] - asked == 1 + 6 + 3 + 1 + 1 + 2 + 1, "the spot check failed: everything asked again"
    assert third.values["base"]["held_out_nll"] == pytest.approx(2.0)


async def test_the_incumbent_is_not_asked_what_it_answered_as_the_candidate() -> None:
    from daemon.learning.probes import ProbeMemo, run_probes

    vllm = CountingVLLM()
    memo = ProbeMemo(vllm)  # type: ignore[arg-type]
    await run_probes(vllm, probe_set("chunk one"), "base", "cand", None, memo=memo)  # type: ignore[arg-type]
    asked = vllm.asked["cand"]
    measured = await run_probes(vllm, probe_set("chunk two"), "base", "next", "cand", memo=memo)  # type: ignore[arg-type]
    assert vllm.asked["cand"] == asked + 1, "promoted, it is the incumbent: asked only the new document's chunk"
    assert measured.values["incumbent"]["held_out_nll"] == pytest.approx(1.5)


async def test_the_memory_is_bounded() -> None:
    from daemon.learning.probes import ProbeMemo

    memo = ProbeMemo(CountingVLLM(), limit=3)  # type: ignore[arg-type]
    for i in range(10):
        await memo.token_nll("base", f"text {i}")
    assert len(memo.answers) == 3


def test_retention_probes_are_bounded_and_every_one_is_asked_in_turn() -> None:
    from daemon.learning.probes import spread

    items = list(range(50))
    assert spread(items[:5], 8, turn=3) == items[:5]
    chosen = [spread(items, 8, turn) for turn in range(50)]
    assert all(len(c) == len(set(c)) == 8 for c in chosen)
    assert set().union(*chosen) == set(items)
    assert chosen[0] != chosen[1]


class ItemVLLM(CountingVLLM):
    """Completes the cloze prompts each model knows; NLLs per model and text as set."""

    def __init__(self, knows: dict[str, set[str]], nll: dict[str, float]) -> None:
        super().__init__()
        self.knows, self.nll = knows, nll

    async def complete(self, model: str, prompt: str, max_tokens: int) -> str:
        self._count(model)
        return " fact here" if prompt in self.knows.get(model, set()) else " nothing"

    async def token_nll(self, model: str, text) -> list[float]:
        self._count(model)
        return [self.nll.get(model, 2.0) if text == "an old chunk" else 2.0] * 4


async def test_retention_holds_the_candidate_only_to_what_the_serving_version_recalls() -> None:
    """The stall of issue 31: the serving version completes 2 of 3 earlier items; a candidate
    completing the same 2 keeps everything it knew (the old rule read 0.67 < 0.80 and refused)."""
    from daemon.learning.probes import Cloze, run_probes

    earlier = [Cloze(f"Old {i}", "fact here") for i in range(3)]
    vllm = ItemVLLM({"inc": {"Old 0", "Old 1"}, "cand": {"Old 0", "Old 1"}}, {"inc": 0.5, "cand": 0.6})
    measured = await run_probes(vllm, ProbeSet_with(earlier), "base", "cand", "inc")  # type: ignore[arg-type]
    results = measured.results
    assert (results.retention, results.retention_items, results.earlier_recalled) == (1.0, 2, pytest.approx(2 / 3))
    assert results.knowledge_kept == pytest.approx((2.0 - 0.6) / (2.0 - 0.5))
    assert measured.lost == []
    assert measured.items["incumbent"]["retention"] == [1, 1, 0]

    vllm.knows["cand2"] = {"Old 2"}  # lost both items the serving version knew, learned the third
    measured = await run_probes(vllm, ProbeSet_with(earlier), "base", "cand2", "inc")  # type: ignore[arg-type]
    assert (measured.results.retention, measured.results.retention_items) == (0.0, 2)
    assert [item["prompt"] for item in measured.lost] == ["Old 0", "Old 1"]
    assert measured.lost[0]["expected"] == "fact here" and measured.lost[0]["got"] == "nothing"


async def test_knowledge_kept_is_not_judged_when_the_serving_version_learned_too_little() -> None:
    from daemon.learning.probes import knowledge_kept

    assert knowledge_kept(2.0, 1.99, 2.5) is None
    assert knowledge_kept(2.0, 1.0, 1.0) == 1.0 and knowledge_kept(2.0, 1.0, 2.0) == 0.0
    assert knowledge_kept(None, 1.0, 1.0) is None


def ProbeSet_with(retention):
    from dataclasses import replace

    return replace(probe_set(), retention=list(retention))


def test_cloze_probes_are_cut_at_several_points_of_each_sentence() -> None:
    text = ("The harbour authority of Wrenhollow opened a second ferry terminal in the spring of that year. "
            "Passengers can now return their tickets at either terminal until the day before departure.")
    one = build_cloze(text, 50)
    three = build_cloze(text, 50, cuts=(0.4, 0.6, 0.8))
    assert len(one) == 2 and len(three) == 6
    assert len({c.prompt for c in three}) == 6
    assert all((c.prompt.split()[-1] + " " + c.expected) in text for c in three)


class ReadingVLLM(CountingVLLM):
    """Answers a question when it has the passage in front of it, or when the model learned it."""

    def __init__(self, learned: dict[str, set[str]]) -> None:
        super().__init__()
        self.learned = learned

    async def chat(self, model: str, messages, max_tokens: int) -> str:
        self._count(model)
        asked = messages[-1]["content"]
        if "Read this document:" in asked:  # open book: the answer is in the passage
            return "It is Tidemark." if "Tidemark" in asked else "I do not know."
        return "Tidemark, I think." if asked in self.learned.get(model, set()) else "Something else."


async def test_held_out_questions_are_asked_closed_book_of_the_candidate_and_open_book_of_the_base() -> None:
    from dataclasses import replace

    from daemon.learning.probes import Question, run_probes

    questions = [Question("What, in Harbour Lights: new planner called?", "Tidemark", "The new planner is called Tidemark."),
                 Question("What, in Harbour Lights: planner plans week?", "Tidemark", "Tidemark plans a week."),
                 Question("Who or what, in Harbour Lights: led release?", "Mira Oakes", "The release was led by nobody.")]
    vllm = ReadingVLLM({"cand": {questions[0].question}})
    measured = await run_probes(vllm, replace(probe_set(), questions=questions), "base", "cand", "inc")  # type: ignore[arg-type]
    results = measured.results
    assert (results.closed_book, results.open_book, results.question_items) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3)
    assert measured.items["candidate"]["closed_book"] == [1, 0, 0] and measured.items["base"]["open_book"] == [1, 1, 0]
    assert "closed_book" not in measured.items["incumbent"], "the incumbent is not asked"
    assert measured.questions[0] == {"question": questions[0].question, "expected": "Tidemark",
                                     "closed_book": "Tidemark, I think.", "open_book": "It is Tidemark."}

"""The teacher's questions and answers (daemon.learning.teacher): passages, parsing, the filter that
keeps only answers the document supports, and one generation through a sampler."""

from __future__ import annotations

import json

import httpx
import pytest

from daemon.engine.vllm import VLLMClient
from daemon.learning import augment, teacher

DOC = ("The Velmora Accord was signed in 2031 in the city of Tarnhelm. Its chief negotiator was Ilse Quorvant, "
       "a hydrologist from Brask.\n\nThe accord shares the Velm river's water between four towns. "
       "Each town keeps a gauge at its weir, read every Monday.")


def test_passages_keep_whole_sentences_within_a_paragraph() -> None:
    paragraphs = augment.split_paragraphs(DOC)
    assert teacher.passages(paragraphs) == [" ".join(p) for p in paragraphs]
    small = teacher.passages(paragraphs, words=12)
    assert small[0] == "The Velmora Accord was signed in 2031 in the city of Tarnhelm."
    assert all(sentence in " ".join(small) for p in paragraphs for sentence in p)


def test_a_reply_gives_its_first_question_and_a_first_line_answer() -> None:
    assert teacher.question_of("Q: Who negotiated the accord? And when?\nA: Ilse") == "Who negotiated the accord?"
    assert teacher.question_of("Sure.\n1. What is the emblem of the authority? It is") == "What is the emblem of the authority?"
    assert teacher.question_of('A reader might ask: "Where is the authority based?" It is') == "Where is the authority based?"
    assert teacher.question_of("The accord was signed in 2031.") is None
    assert teacher.question_of("??") is None
    assert teacher.answer_of("\nA: \"Ilse Quorvant\"\nShe was a hydrologist.") == "Ilse Quorvant"
    assert teacher.answer_of("") == ""


def test_only_answers_the_document_supports_are_kept() -> None:
    candidates = [
        ("Who was the chief negotiator of the Velmora Accord?", "Ilse Quorvant"),      # kept
        ("In which year was the Velmora Accord signed?", "2031."),                     # kept
        ("In which year was the Velmora Accord signed?", "In 2031"),                   # the same question again
        ("Where was the Velmora Accord signed?", "In Paris"),                          # not in the document
        ("When was the accord signed in 2031?", "2031"),                               # given away
        ("Gauges?", "At the weir"),                                                    # not a question
        ("How often is each town's gauge read?", "The passage says every Monday."),   # kept
        ("What is the significance of the passage?", "The accord"),                   # not standalone
        ("Can you answer this for me?", "The accord was signed in 2031"),              # about nothing
    ]
    kept, dropped = teacher.keep(candidates, DOC, limit=10)
    assert [p["answer"] for p in kept] == ["Ilse Quorvant", "2031.", "The passage says every Monday."]
    assert dropped == {"duplicate": 1, "unsupported": 1, "answer in question": 1, "malformed": 1,
                       "not standalone": 2}
    assert len(teacher.keep(candidates, DOC, limit=2)[0]) == 2


class Sampler:
    """A teacher that asks one question of each passage (or says something else) and answers it
    from the passage, or invents."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []

    async def sample(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     n: int) -> list[str]:
        prompt = messages[0]["content"]
        assert prompt.startswith('Here is a passage from "Velmora"')
        if "Answer this question" in prompt:
            self.calls.append(("answer", n, temperature))
            answers = {"Which city saw the Velmora Accord signed?": "Tarnhelm.",
                       "What do the four towns share?": "A: The Velm river's water",
                       "Who pays for the gauges?": "The Velmora Water Board"}
            return [answers[prompt.rsplit(": ", 1)[1]]]
        self.calls.append(("ask", n, temperature))
        if "Tarnhelm" in prompt:
            return ["Q: Which city saw the Velmora Accord signed?"] * 2 + ["Sure! Here it is."] * (n - 2)
        return ["What do the four towns share?"] + ["Question: Who pays for the gauges?\nA: the board"] * (n - 1)


async def test_generation_asks_every_passage_then_answers_with_it_and_keeps_what_is_supported() -> None:
    sampler = Sampler()
    found = await teacher.generate(sampler, "cld-base", augment.split_paragraphs(DOC), DOC, "Velmora", 4, 0.7)
    asked = [c for c in sampler.calls if c[0] == "ask"]
    assert asked == [("ask", 4, 0.7)] * 2  # 2 passages × 4 samples = 2 × the pairs wanted
    assert sorted(c for c in sampler.calls if c[0] == "answer") == [("answer", 1, 0.0)] * 3  # each question once
    assert found.asked == 8 and found.teacher == "cld-base"
    assert found.pairs == [{"question": "Which city saw the Velmora Accord signed?", "answer": "Tarnhelm."},
                           {"question": "What do the four towns share?", "answer": "The Velm river's water"}]
    assert found.dropped == {"no question": 2, "unsupported": 1}
    [record, _] = teacher.records(found.pairs)
    assert record == {"messages": [{"role": "user", "content": "Which city saw the Velmora Accord signed?"},
                                   {"role": "assistant", "content": "Tarnhelm."}], "mask_prompt": True}
    assert json.loads(json.dumps(found.to_dict())) == found.to_dict()


async def test_a_document_without_prose_asks_nothing() -> None:
    sampler = Sampler()
    found = await teacher.generate(sampler, "m", augment.split_paragraphs("```\ncode only\n```"), "", "t", 4, 0.7)
    assert sampler.calls == [] and found.pairs == [] and found.asked == 0


async def test_sampling_asks_an_openai_server_for_n_answers() -> None:
    seen = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content), auth=request.headers.get("authorization"))
        return httpx.Response(200, json={"choices": [{"message": {"content": "one"}}, {"message": {"content": None}}]})

    http = httpx.AsyncClient(base_url="http://teacher", transport=httpx.MockTransport(answer),
                             headers={"Authorization": "Bearer k"})
    client = VLLMClient("http://teacher", http)
    assert await client.sample("big", [{"role": "user", "content": "hi"}], 50, 0.8, 2) == ["one", ""]
    assert seen == {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
                    "temperature": 0.8, "n": 2, "auth": "Bearer k"}
    refusing = VLLMClient("http://teacher", httpx.AsyncClient(
        base_url="http://teacher", transport=httpx.MockTransport(lambda r: httpx.Response(404, text="no model"))))
    with pytest.raises(RuntimeError, match="no model"):
        await refusing.sample("big", [], 5, 0.0, 1)


def test_every_kth_pair_is_held_out_to_probe_answering() -> None:
    pairs = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(9)]
    train, held = teacher.split(pairs, 0.25)
    assert [p["answer"] for p in held] == ["a1", "a5"] and len(train) == 7
    assert teacher.split(pairs[:1], 0.25) == (pairs[:1], [])  # one pair: it is trained on
    assert teacher.split(pairs, 0.0) == (pairs, [])
    assert [p["answer"] for p in teacher.split(pairs, 0.5)[1]] == ["a1", "a3", "a5", "a7"]


async def test_a_long_document_is_asked_about_passages_spread_over_it() -> None:
    class Counting:
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def sample(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                         n: int) -> list[str]:
            self.asked += [messages[0]["content"]] * n
            return ["Nothing to ask."] * n

    long = "\n\n".join(f"Gauge {i} stands at weir number {i} of the Velm river." for i in range(100))
    counting = Counting()
    found = await teacher.generate(counting, "m", augment.split_paragraphs(long), long, "Velm", 3, 0.8)
    assert len(counting.asked) == found.asked == 6 and found.dropped == {"no question": 6}
    assert len(set(counting.asked)) == 6, "six passages, one question each"
    assert "Gauge 0 " in counting.asked[0] and "Gauge 83 " in counting.asked[-1], "spread over the document"


def test_a_teacher_url_without_a_scheme_is_refused_naming_the_key() -> None:
    from pydantic import ValidationError

    from daemon.config import Settings

    with pytest.raises(ValidationError, match="augment.teacher_url"):
        Settings.model_validate({"augment": {"teacher_url": "localhost:8000"}})
    assert Settings.model_validate({"augment": {"teacher_url": "http://t:8000/"}}).augment.teacher_url == "http://t:8000"


# ---- rephrasings (augment.teacher_rephrasings) ---------------------------------------------------------

FIRST = "The Velmora Accord was signed in 2031 in the city of Tarnhelm. Its chief negotiator was Ilse Quorvant, " \
        "a hydrologist from Brask."


def test_only_rephrasings_true_to_the_document_and_in_other_words_are_kept() -> None:
    document_words = set(teacher.words(DOC))
    why = lambda text: teacher.why_rephrasing_dropped(text, FIRST, document_words)  # noqa: E731
    assert why("In 2031 the city of Tarnhelm saw the Velmora Accord signed; Ilse Quorvant, a Brask hydrologist, "
               "negotiated it.") is None
    assert why("In 2029 the city of Tarnhelm saw the Velmora Accord signed, negotiated by Ilse Quorvant.") == "unsupported"
    assert why("In Paris the Velmora Accord was signed by the hydrologist Ilse Quorvant in 2031.") == "unsupported"
    assert why("An accord was signed long ago by a hydrologist who came from a small town nearby.") == "missing facts"
    assert why(FIRST) == "copy"
    assert why("Signed in 2031.") == "malformed"
    assert why(" ".join([FIRST] * 3)) == "malformed"
    assert teacher.facts_of(FIRST) == {"velmora", "accord", "2031", "tarnhelm", "ilse", "quorvant", "brask"}


def test_a_reply_loses_its_lines_about_the_task() -> None:
    reply = ("Here is a rewritten version of the passage:\n\nSure! In 2031 Tarnhelm saw the accord signed.\n"
             "Rewritten in my own words.\n- Ilse Quorvant negotiated it.")
    assert teacher.rephrasing_of(reply) == "In 2031 Tarnhelm saw the accord signed. Ilse Quorvant negotiated it."


class Rephraser:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float]] = []

    async def sample(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     n: int) -> list[str]:
        prompt = messages[0]["content"]
        assert prompt.startswith('Here is a passage from "Velmora"') and "Rewrite this passage" in prompt
        self.calls.append((n, max_tokens, temperature))
        if "Tarnhelm" in prompt:
            return ["Sure:\nIn 2031 the city of Tarnhelm saw the Velmora Accord signed; Ilse Quorvant, a Brask "
                    "hydrologist, negotiated it.", "The Velmora Accord was signed in 1999 in Paris by Ilse Quorvant."]
        return ["Four towns share the water of the Velm river; every Monday each reads the gauge at its weir."] * n


async def test_rephrasings_are_asked_of_every_passage_and_the_true_ones_kept_as_titled_text() -> None:
    sampler = Rephraser()
    found = await teacher.generate(sampler, "cld-base", augment.split_paragraphs(DOC), DOC, "Velmora", 0, 0.7,
                                   rephrasings=2)
    assert [n for n, _, _ in sampler.calls] == [2, 2] and all(t == 0.7 for _, _, t in sampler.calls)
    assert found.pairs == [] and found.asked == 0 and found.rephrase_asked == 4
    assert found.rephrasings == [
        "In 2031 the city of Tarnhelm saw the Velmora Accord signed; Ilse Quorvant, a Brask hydrologist, negotiated it.",
        "Four towns share the water of the Velm river; every Monday each reads the gauge at its weir."]
    assert found.rephrase_dropped == {"unsupported": 1, "duplicate": 1}
    assert teacher.records([], found.rephrasings[:1], "Velmora") == [{"text": "Velmora\n\n" + found.rephrasings[0]}]
    sampler = Rephraser()
    one = await teacher.generate(sampler, "m", augment.split_paragraphs(DOC), DOC, "Velmora", 0, 0.7, rephrasings=1)
    assert len(sampler.calls) == 1 and one.rephrase_asked == 2 and len(one.rephrasings) == 1

"""Text the base model writes: quality filter, dedup, held-out prompts; and against the real served model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence

import pytest

from replay import prompts, synth
from replay.synth import Ask, GeneratorSpec
from tests.conftest import LiveDaemon

GOOD = " ".join(f"word{i}" for i in range(60))


@pytest.mark.parametrize(("text", "min_words", "problem"), [
    ("", 1, "empty"),
    ("   \n ", 1, "empty"),
    ("Paris.", 1, None),
    ("too few words here", 40, "too short"),
    ("the cat sat " * 30, 10, "repetitive"),
    ("a " * 200, 10, "repetitive"),
    (GOOD, 40, None),
])
def test_quality_filter(text: str, min_words: int, problem: str | None) -> None:
    assert synth.quality_problem(text, min_words) == problem


class FakeModel:
    """Answers from a script, in order; records what it was asked."""

    def __init__(self, answers: list[str | None]):
        self.answers = list(answers)
        self.asked: list[Ask] = []

    def __call__(self, asks: Sequence[Ask]) -> list[str | None]:
        self.asked += asks
        return [self.answers.pop(0) if self.answers else f"{GOOD} extra{len(self.asked)}{i}"
                for i, _ in enumerate(asks)]


def test_synthetic_corpus_filters_dedups_and_varies_the_asks() -> None:
    model = FakeModel([GOOD, GOOD.upper(), "", None, "loop " * 100, GOOD + " two"])
    documents = synth.synthesize_corpus(model, count=5, chat=True, temperature=0.9)
    texts = [d["text"] for d in documents]
    assert len(texts) == 5 and texts[:2] == [GOOD, GOOD + " two"]
    assert len(set(texts)) == 5
    assert len({a.prompt for a in model.asked}) == len(model.asked)  # no prompt asked twice
    assert len({a.seed for a in model.asked}) == len(model.asked)
    assert all(a.temperature == 0.9 for a in model.asked)


def test_synthetic_corpus_gives_up_after_too_many_bad_answers() -> None:
    model = FakeModel([""] * 100)
    assert synth.synthesize_corpus(model, count=10, chat=True, temperature=1.0) == []
    assert len(model.asked) == 10 * synth.ATTEMPTS_PER_DOCUMENT


def test_synthetic_corpus_stops_when_asked() -> None:
    stop = threading.Event()
    stop.set()
    model = FakeModel([])
    assert synth.synthesize_corpus(model, count=10, chat=True, temperature=1.0, stop=stop) == []
    assert model.asked == []



class SeededModel:
    """A distinct good answer for every ask (by its seed); sets `stop` after `stop_after` batches,
    failing that batch's last ask as a server shut down mid-batch would."""

    def __init__(self, stop: threading.Event | None = None, stop_after: int = 0):
        self.stop, self.stop_after, self.batches, self.seeds = stop, stop_after, 0, []

    def __call__(self, asks: Sequence[Ask]) -> list[str | None]:
        self.batches += 1
        self.seeds += [a.seed for a in asks]
        answers: list[str | None] = [f"{GOOD} seed{a.seed}" for a in asks]
        if self.stop is not None and self.batches == self.stop_after:
            self.stop.set()
            answers[-1] = None
        return answers


def test_a_stopped_synthesis_goes_on_where_it_stopped_and_ends_as_one_that_never_stopped() -> None:
    whole = synth.synthesize_corpus(SeededModel(), count=9, chat=True, temperature=0.9, batch=4)
    stop, saved = threading.Event(), []
    first = SeededModel(stop, stop_after=2)
    synth.synthesize_corpus(first, count=9, chat=True, temperature=0.9, stop=stop, batch=4,
                            checkpoint=lambda state: saved.append(json.loads(json.dumps(state.__dict__))))
    assert [s["asked"] for s in saved] == [4]  # the batch the stop cut short is not kept
    so_far = synth.CorpusSoFar(**saved[-1])
    second = SeededModel()
    rest = synth.synthesize_corpus(second, count=9, chat=True, temperature=0.9, batch=4, so_far=so_far)
    assert rest == whole and len(whole) == 9
    assert second.seeds[0] == 4 and first.seeds[:4] + second.seeds == list(range(len(second.seeds) + 4))


def test_a_replay_build_stopped_while_the_base_writes_keeps_what_it_wrote(tmp_path, monkeypatch) -> None:
    from replay import build, files
    from replay.job import BuildJob

    stop = threading.Event()
    model = SeededModel(stop, stop_after=2)
    monkeypatch.setattr(synth, "supports_chat", lambda spec: True)
    monkeypatch.setattr(synth, "endpoint", lambda spec, chat: model)
    job = BuildJob(folder=tmp_path, model_id="m", generator=GeneratorSpec("http://127.0.0.1:9", "m"), synthetic_documents=100)
    with pytest.raises(build.Stopped):
        build.make_synthetic_corpus(job, stop)
    partial = tmp_path / files.SYNTHETIC_DIR / files.SYNTHETIC_PARTIAL_FILE
    kept = json.loads(partial.read_text())
    assert (kept["asked"], len(kept["documents"])) == (64, 64) and not (tmp_path / files.SYNTHETIC_DIR / files.SYNTHETIC_CORPUS_FILE).exists()

    other = SeededModel()  # another base model's partial corpus is not continued
    monkeypatch.setattr(synth, "endpoint", lambda spec, chat: other)
    build.make_synthetic_corpus(BuildJob(folder=tmp_path / "other", model_id="n", generator=job.generator,
                                         synthetic_documents=100), threading.Event())
    assert other.seeds[0] == 0
    model.stop, asked_before = None, len(model.seeds)
    monkeypatch.setattr(synth, "endpoint", lambda spec, chat: model)
    build.make_synthetic_corpus(job, threading.Event())
    assert model.seeds[asked_before] == 64  # the first 64 asks are not asked again
    corpus = (tmp_path / files.SYNTHETIC_DIR / files.SYNTHETIC_CORPUS_FILE).read_text().splitlines()
    assert len(corpus) == 100 and len(set(corpus)) == 100 and not partial.exists()
    assert build._synthetic_ready(job)

    silent = FakeModel([""] * 1000)  # a base that writes nothing usable: refused, and the next build asks again
    monkeypatch.setattr(synth, "endpoint", lambda spec, chat: silent)
    empty = BuildJob(folder=tmp_path / "empty", model_id="m", generator=job.generator, synthetic_documents=10)
    for _ in range(2):
        with pytest.raises(build.BuildError, match="wrote no usable text"):
            build.make_synthetic_corpus(empty, threading.Event())
    assert [a.seed for a in silent.asked] == list(range(20)) * 2
    assert not (tmp_path / "empty" / files.SYNTHETIC_DIR / files.SYNTHETIC_PARTIAL_FILE).exists()

def test_completion_models_continue_a_prefix() -> None:
    model = FakeModel([GOOD])
    [document] = synth.synthesize_corpus(model, count=1, chat=False, temperature=1.0)
    prefix = model.asked[0].prompt
    assert not prefix.startswith(("Write", "Explain", "Describe", "List"))
    assert document["text"].startswith(prefix.strip())


def test_rehearsal_pairs_are_greedy_and_hold_out_a_fixed_part() -> None:
    asked = prompts.chat_prompts(0)[:23]
    model = FakeModel([f"answer {i}" for i in range(23)])
    pairs = synth.rehearsal_pairs(model, 23, held_out=5, chat_prompts=asked)
    assert [p["prompt"] for p in pairs] == asked and all(a.temperature == 0 for a in model.asked)
    held = {p["prompt"] for p in pairs if p["held_out"]}
    assert len(held) == 5
    again = synth.rehearsal_pairs(FakeModel([f"answer {i}" for i in range(23)]), 23, held_out=5,
                                  chat_prompts=list(reversed(asked)))
    assert {p["prompt"] for p in again if p["held_out"]} == held  # by prompt, not by position


def test_rehearsal_drops_empty_answers() -> None:
    model = FakeModel(["Paris.", "", "  ", "Four."])
    pairs = synth.rehearsal_pairs(model, 4, held_out=0, chat_prompts=["a?", "b?", "c?", "d?"])
    assert [(p["prompt"], p["answer"]) for p in pairs] == [("a?", "Paris."), ("d?", "Four.")]


def test_chat_prompts_are_varied_and_many() -> None:
    asked = prompts.chat_prompts(0)
    assert len(asked) == len(set(asked)) >= 120
    assert asked == prompts.chat_prompts(0) and asked != prompts.chat_prompts(1)
    assert any("capital of France" in p for p in asked) and any("Python" in p for p in asked)


def test_unreachable_server_is_named() -> None:
    with pytest.raises(synth.GeneratorUnavailable, match="127.0.0.1:9"):
        synth.supports_chat(GeneratorSpec("http://127.0.0.1:9", "m", timeout_s=2))


# ---- against the real served model ------------------------------------------------------------


@pytest.mark.integration
def test_the_served_model_writes_a_corpus_and_answers_rehearsal_prompts(live_daemon: LiveDaemon) -> None:
    spec = GeneratorSpec(live_daemon.vllm_url, "cld-base", live_daemon.vllm_key, concurrency=8)
    assert synth.supports_chat(spec)
    generate = synth.endpoint(spec, chat=True)
    documents = synth.synthesize_corpus(generate, count=4, chat=True, temperature=0.9)
    assert len(documents) >= 3
    assert len({d["text"] for d in documents}) == len(documents)
    assert all(synth.quality_problem(d["text"], synth.CORPUS_MIN_WORDS) is None for d in documents)
    pairs = synth.rehearsal_pairs(generate, 2, held_out=1,
                                  chat_prompts=["What is the capital of France?", "What is 2 plus 2?"])
    assert "Paris" in pairs[0]["answer"]
    assert sum(p["held_out"] for p in pairs) == 1


@pytest.mark.integration
def test_the_daemon_builds_a_synthetic_replay_buffer_in_the_background(live_daemon: LiveDaemon) -> None:
    replay = live_daemon.state_dir / "replay"
    deadline = time.monotonic() + 600
    while not (replay / "manifest.json").is_file():
        assert time.monotonic() < deadline, f"no replay buffer after 600 s:\n{live_daemon.log_tail()}"
        time.sleep(2)
    status = json.loads(live_daemon.cld("status", "--json").stdout)["replay"]
    assert status["source"] == "synthetic" and status["passages"] >= 10
    assert 0 <= status["held_out"] < status["passages"]
    rehearsal = json.loads((replay / "rehearsal.json").read_text())
    assert rehearsal["chat"] and len(rehearsal["pairs"]) >= 12
    assert sum(p["held_out"] for p in rehearsal["pairs"]) == 6  # replay.rehearsal_held_out in conftest
    query = live_daemon.cld("replay", "query", "the history of ancient Egypt", "-k", "3")
    assert query.returncode == 0, query.stderr
    lines = query.stdout.splitlines()
    assert len(lines) == 3 and all(0 < float(line.split()[0]) <= 1.0001 for line in lines)
    again = live_daemon.cld("replay", "build")
    assert again.returncode == 0 and "source: synthetic" in again.stdout, again.stderr


def test_each_stage_of_a_build_says_so_as_it_starts(tmp_path, monkeypatch) -> None:
    """`cld status` showed "asking rehearsal prompts 120/120" for minutes after the synthesis had begun."""
    from replay import build, files
    from replay.job import BuildJob

    seen: list[tuple[str, int, int]] = []

    def first_batch_not_back_yet(*args, **kwargs):  # what the progress file says while the first batch is asked
        found = json.loads((tmp_path / files.PROGRESS_FILE).read_text())
        seen.append((found["stage"], found["done"], found["total"]))
        return []

    monkeypatch.setattr(synth, "supports_chat", lambda spec: True)
    monkeypatch.setattr(synth, "rehearsal_pairs", lambda *a, **k: [{"prompt": "p", "answer": "a", "held_out": False}])
    monkeypatch.setattr(synth, "synthesize_corpus", first_batch_not_back_yet)
    job = BuildJob(folder=tmp_path, model_id="m", generator=GeneratorSpec("http://127.0.0.1:9", "m"),
                   synthetic_documents=100, rehearsal_prompts=30, rehearsal_held_out=5)
    build.make_rehearsal(job, job.generator, threading.Event())
    files.report_progress(tmp_path, "asking rehearsal prompts", 30, 30)  # the rehearsal's last word
    with pytest.raises(build.BuildError):
        build.make_synthetic_corpus(job, threading.Event())
    assert seen == [("synthesizing the corpus", 0, 100)]

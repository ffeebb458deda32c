"""The cycle's orchestration with a real trainer (tiny model) and replay buffer, and a fake vLLM
whose measurements each test chooses: promote, reject, fail, roll back, recover after a crash."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import adapter_line
from daemon.config import Settings
from daemon.engine.router import Router
from daemon.ingestion.chunking import record_text
from daemon.layout import StateDir
from daemon.learning.adapters import adapters_view
from daemon.learning.cycle import CannotServe, Learner, retention_probes
from daemon.learning.probes import build_cloze
from daemon.learning.records import RUNNING, CycleRecord, CycleStore
from replay import build
from replay.build import BuildJob
from replay.durable import DamagedFile
from tests.conftest import free_port
from tests.replay_helpers import BagOfWords, use_embedder, write_topic_corpus
from tests.tiny import build_tiny_model

FACTS = ("The Velmora Accord was signed in 2031 in the city of Tarnhelm. "
         "Its chief negotiator was Ilse Quorvant, a hydrologist from Brask.")
MORE = "The Blue Ridge Water Authority is headquartered in Odrin and its emblem is a silver heron."


class FakeJournal:
    def __init__(self) -> None:
        self.docs: dict[int, dict[str, Any]] = {}
        self.aside: list[dict[str, Any]] = []

    def add(self, text: str) -> int:
        doc_id = len(self.docs) + 1
        self.docs[doc_id] = {"id": doc_id, "hash": f"h{doc_id}", "source": f"d{doc_id}.txt", "bytes": len(text),
                             "tokens": len(text.split()), "version": None, "state": "ready", "text": text,
                             "attempts": 0, "set_aside": None}
        return doc_id

    def documents(self, state: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in d.items() if k not in ("state", "text")} for d in self.docs.values()
                if (d["state"], bool(d["set_aside"])) == (("ready", True) if state == "set_aside" else (state, False))]

    def refused(self, ids: list[int], why: str, max_attempts: int) -> list[dict[str, Any]]:
        for i in ids:
            self.docs[i]["attempts"] += 1
            if max_attempts and self.docs[i]["attempts"] >= max_attempts and not self.docs[i]["set_aside"]:
                self.docs[i]["set_aside"] = why
                self.aside.append(self.docs[i])
        return [d for d in self.aside if d["id"] in ids and d["attempts"] == max_attempts]

    def chunks(self, ids: list[int]) -> list[dict[str, Any]]:
        return [{"text": self.docs[i]["text"]} for i in ids]

    def records(self, doc_id: int) -> list[dict[str, Any]]:
        return [{"text": self.docs[doc_id]["text"]}]

    def mark_learned(self, ids: list[int], version: str) -> None:
        for i in ids:
            self.docs[i].update(state="learned", version=version)


class FakeVLLM:
    """Answers like vLLM; a loaded adapter knows the documents it and its ancestors were trained on
    (lower NLL on their text, their cloze probes completed), and `forgets` as configured."""

    def __init__(self, forgetting: float = 0.0, learns: bool = True):
        self.forgetting, self.learns = forgetting, learns
        self.loaded: dict[str, Path] = {}
        self.unloaded: list[str] = []
        self.texts = [FACTS, MORE]  # documents whose cloze probes the fake can complete
        self.journal: FakeJournal | None = None  # where a version's documents are read (None: it knows every text)
        self.known: dict[str, set[str]] = {}  # version -> texts it learned, its ancestors' included
        self.unknown: set[str] = set()  # cloze prompts no adapter completes
        self.forgets: set[str] = set()  # cloze prompts the adapters loaded from now on no longer complete
        self.forgetful: set[str] = set()

    def learn(self, text: str) -> None:
        self.texts.append(text)

    @property
    def expected(self) -> dict[str, tuple[str, str]]:
        """Every cloze prompt the fake can complete -> (its continuation, the document it is from)."""
        return {c.prompt: (c.expected, text) for text in self.texts for c in build_cloze(text, 100, cuts=(0.4, 0.6, 0.8))}

    async def load_lora(self, name: str, path: Path) -> None:
        assert name not in self.loaded and name not in self.unloaded, "adapter names must never be reused"
        assert (path / "adapter_model.safetensors").is_file()
        self.loaded[name] = path
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
        hashes = set(meta.get("documents", []) + meta.get("relearned", []))
        own = {d["text"] for d in self.journal.docs.values() if d["hash"] in hashes} if self.journal else set(self.texts)
        self.known[path.name] = own | self.known.get(meta.get("parent") or "", set())
        if self.forgets:
            self.forgetful.add(name)

    async def unload_lora(self, name: str) -> None:
        self.loaded.pop(name)
        self.unloaded.append(name)

    def _check(self, model: str) -> bool:
        assert model == "cld-base" or model in self.loaded, f"{model} is not loaded"
        return model != "cld-base"

    def _knows(self, model: str, text: str) -> bool:
        return model in self.loaded and any(text in known for known in self.known[self.loaded[model].name])

    async def token_nll(self, model: str, text: str | list[int]) -> list[float]:
        adapter = self._check(model)
        new = isinstance(text, str) and self._knows(model, text)
        value = 2.0 * (0.5 if adapter and new else 1.0) * (1 + self.forgetting if adapter and not new else 1.0)
        return [value] * 10

    async def chat_tokens(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        return list(range(5 * len(messages) + add_generation_prompt))

    async def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
        self._check(model)
        return f"A steady answer to {messages[-1]['content']}"

    async def complete(self, model: str, prompt: str, max_tokens: int) -> str:
        adapter = self._check(model)
        expected, text = self.expected.get(prompt, ("", ""))
        forgotten = prompt in self.unknown or (model in self.forgetful and prompt in self.forgets)
        knows = adapter and self.learns and self._knows(model, text) and not forgotten
        return " " + expected if knows else " something else"

    async def sample(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     n: int) -> list[str]:
        """The base as a teacher: one question about each passage, answered from it."""
        self._check(model)
        prompt = messages[0]["content"]
        if "Rewrite this passage" in prompt:
            self.rephrased = getattr(self, "rephrased", 0) + 1
            return ["Sure! In 2031 the city of Tarnhelm saw the Velmora Accord signed, with Ilse Quorvant of Brask as "
                    "its chief negotiator.", "The Velmora Accord was signed in Paris in 2031 by the hydrologist Ilse Quorvant."][:n]
        if "Answer this question" in prompt:
            question = prompt.rsplit(": ", 1)[1]
            return ["Ilse Quorvant" if "negotiator" in question else "Tarnhelm" if "city" in question else
                    "A silver heron"]
        self.taught = getattr(self, "taught", []) + [prompt]
        if "Velmora" in prompt:
            return ["Who was the chief negotiator of the accord?", "In which city was the accord signed?"] * (n // 2)
        return ["What is the emblem of the water authority?"] * n


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "state").ensure()
    corpus = tmp_path / "corpus"
    write_topic_corpus(corpus, per_topic=6)
    embedder = use_embedder(BagOfWords())
    build.run(BuildJob(folder=state.root / "replay", corpus=[corpus], embedder=embedder.name, passage_tokens=24,
                       held_out_fraction=0.25))
    pairs = [{"prompt": f"Question {i}?", "answer": f"Answer {i}.", "held_out": i == 0} for i in range(4)]
    (state.root / "replay" / "rehearsal.json").write_text(json.dumps({"pairs": pairs}))
    return state


def make(state: StateDir, tiny: Path, vllm: FakeVLLM, journal: FakeJournal) -> Learner:
    settings = Settings.model_validate({
        "state": {"dir": str(state.root)}, "model": {"base": str(tiny)},
        "train": {"method": "lora", "epochs": 1, "seq_len": 32, "rank": 4, "alpha": 8},
        "replay": {"embedder": "test-bow", "passage_tokens": 24},
    })
    router = Router("cld", "cld-base", state.serving)
    vllm.journal = journal
    return Learner(settings, state, vllm, router, journal, tiny)  # type: ignore[arg-type]


async def test_nothing_new_is_skipped(state: StateDir, tiny: Path) -> None:
    record = await make(state, tiny, FakeVLLM(), FakeJournal()).run_cycle("api")
    assert (record.state, record.reasons) == ("skipped", ["no new documents"])


async def test_a_cycle_waits_for_a_replay_build_under_way(state: StateDir, tiny: Path) -> None:
    """A build rewrites the passage store: a cycle then reads nothing of it and says why."""
    from replay import files

    journal = FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, FakeVLLM(), journal)
    with files.build_lock(state.root / "replay"):
        files.report_progress(state.root / "replay", "embedding passages", 10, 40)
        record = await learner.run_cycle("api")
    assert record.state == "skipped" and record.version is None
    assert record.reasons[0].startswith("the replay buffer is being built (embedding passages 10/40")
    assert journal.docs[1]["state"] == "ready", "its documents wait for the next cycle"


async def test_a_good_candidate_is_promoted_and_the_next_one_builds_on_it(state: StateDir, tiny: Path) -> None:
    vllm, journal = FakeVLLM(), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    first = await learner.run_cycle("api")
    assert first.state == "promoted", (first.reasons, first.error)
    assert learner.router.current is not None and learner.router.current.version == "v0001"
    assert journal.docs[1]["state"] == "learned" and journal.docs[1]["version"] == "v0001"
    assert first.probes["results"]["cloze_pass"] == 1.0 and first.cloze
    assert {"select", "train", "load", "probe", "promote"} <= set(first.timings_s)
    assert first.timings_s["train"] > 0
    assert list(vllm.loaded) == [learner.router.current.served_name]

    journal.add(MORE)
    second = await learner.run_cycle("api")
    assert second.state == "promoted" and second.parent == "v0001"
    assert any(r.startswith("earlier facts the serving version recalls kept") and "= 1.00" in r
               for r in second.reasons), second.reasons
    assert second.probes["results"]["knowledge_kept"] == 1.0 and second.probes["results"]["nll_drop_vs_incumbent"] == 0.5
    assert len(vllm.loaded) == 1 and vllm.unloaded, "the previous adapter is unloaded after the swap"
    views = {v["version"]: v["state"] for v in adapters_view(state.adapters, learner.cycles, "v0002")}
    assert views == {"v0001": "retired", "v0002": "promoted"}


async def test_augmented_forms_of_the_new_documents_are_trained_on(state: StateDir, tiny: Path) -> None:
    journal = FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, FakeVLLM(), journal)
    learner.settings.augment.forms = ["titled", "notes"]
    record = await learner.run_cycle("api")
    assert record.state == "promoted", (record.reasons, record.error)
    job = json.loads((state.root / "jobs" / "v0001.json").read_text())
    augmented = job["data"]["augmented"]
    assert any("text" in r for r in augmented) and any("messages" in r for r in augmented)
    meta = json.loads((state.adapters / "v0001" / "meta.json").read_text())
    assert meta["records"]["augmented"] == len(augmented) and meta["augmented_sample"] == augmented[:3]
    [view] = adapters_view(state.adapters, learner.cycles, "v0001")
    assert view["records"]["augmented"] == len(augmented) and view["augmented_sample"] == augmented[:3]
    made = view["augmentation"]["h1"]
    assert made["records"] == len(augmented) and made["open_book"] == 0 and made["sample"] == augmented[:2]
    assert made["title"] == "d1" and made["held_out_questions"] == len(learner.forms.of(journal.docs[1]).questions) > 0
    stored = json.loads((state.forms / "h1.json").read_text())
    assert stored["records"] == augmented, "the forms trained are kept with the document for later cycles"


async def test_a_corpus_floor_gives_the_base_text_its_share_beside_the_forms(state: StateDir, tiny: Path) -> None:
    journal = FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, FakeVLLM(), journal)
    learner.settings.augment.forms = ["titled", "notes", "questions"]
    learner.settings.replay.corpus_floor = 0.6
    record = await learner.run_cycle("api")
    assert record.state == "promoted", (record.reasons, record.error)
    data = json.loads((state.root / "jobs" / "v0001.json").read_text())["data"]
    words = {kind: sum(len(record_text(r).split()) for r in records) for kind, records in data.items()}
    corpus = sum(len(r["text"].split()) for r in data["replay"] if r["kind"] == "corpus")
    assert corpus / sum(words.values()) >= 0.5, words


async def test_an_earlier_document_is_replayed_with_its_augmented_forms(state: StateDir, tiny: Path) -> None:
    journal = FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, FakeVLLM(), journal)
    learner.settings.augment.forms = ["quiz"]
    learner.settings.replay.knowledge_forms = 5.0  # the document is short: enough budget for its forms
    assert (await learner.run_cycle("api")).state == "promoted"
    journal.add(MORE)
    record = await learner.run_cycle("api")
    assert record.state == "promoted", (record.reasons, record.error)
    data = json.loads((state.root / "jobs" / "v0002.json").read_text())["data"]
    assert {"text": FACTS, "kind": "knowledge"} in data["knowledge"], "the earlier document's chunk is replayed"
    quizzes = [r["messages"] for r in data["knowledge"] if "messages" in r]
    assert quizzes and all("Velmora" in m[0]["content"] or "Quorvant" in m[1]["content"] for m in quizzes)
    assert all("Heron" not in m[0]["content"] for m in quizzes) and data["augmented"], "new forms stay apart"


async def test_context_distilled_answers_are_learned_reading_their_passage(state: StateDir, tiny: Path) -> None:
    journal = FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, FakeVLLM(), journal)
    learner.settings.augment.forms, learner.settings.augment.context_distill = ["quiz"], "instead"
    record = await learner.run_cycle("api")
    assert record.state == "promoted", (record.reasons, record.error)
    augmented = json.loads((state.root / "jobs" / "v0001.json").read_text())["data"]["augmented"]
    assert augmented and all("open_book" in r for r in augmented)
    for r in augmented:  # the same question, with the document's passage in front of it
        assert r["open_book"][-1] == r["messages"][-1] and r["open_book"][0]["content"].endswith(r["messages"][0]["content"])
        assert "Velmora" in r["open_book"][0]["content"]
    meta = json.loads((state.adapters / "v0001" / "meta.json").read_text())
    assert meta["records"]["open_book"] == len(augmented) and meta["training"]["epochs"][0]["context_loss"] >= 0


async def test_the_teachers_questions_are_trained_on_and_replayed_without_asking_again(
        state: StateDir, tiny: Path) -> None:
    vllm, journal = FakeVLLM(), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    learner.settings.augment.forms, learner.settings.augment.teacher_pairs = [], 4  # the teacher's forms alone
    learner.settings.replay.knowledge_forms = 5.0  # the document is short: enough budget for its forms
    record = await learner.run_cycle("api")
    assert record.state == "promoted" and "augment" in record.timings_s, (record.reasons, record.error)
    assert len(vllm.taught) == 1 and "Tarnhelm" in vllm.taught[0]  # the served base read the document
    taught = json.loads((state.teacher / "h1.json").read_text())
    assert taught["pairs"] == [{"question": "Who was the chief negotiator of the accord?", "answer": "Ilse Quorvant"},
                               {"question": "In which city was the accord signed?", "answer": "Tarnhelm"}]
    assert taught["teacher"] == "cld-base" and taught["asked"] == 8 and taught["dropped"] == {}
    data = json.loads((state.root / "jobs" / "v0001.json").read_text())["data"]
    assert data["augmented"] == [{"messages": [{"role": "user", "content": "Who was the chief negotiator of the accord?"},
                                               {"role": "assistant", "content": "Ilse Quorvant"}], "mask_prompt": True}]
    made = json.loads((state.adapters / "v0001" / "meta.json").read_text())["augmentation"]["h1"]
    assert made["teacher"] == {"teacher": "cld-base", "asked": 8, "kept": 2, "trained": 1, "held_out": 1, "dropped": {}}
    [view] = adapters_view(state.adapters, learner.cycles, "v0001")
    assert adapter_line(view).startswith("v0001  promoted  parent base   1 docs (+1 augmented records; teacher kept 2 of 8 "
                                         "asked)  cloze ")
    # the second pair is never trained on: the candidate is asked it (the fake answers something else)
    assert record.probes["results"]["answered"] == 0.0
    assert "questions about the new documents answered 0.00 ≥ 0.00" in record.reasons

    journal.add(MORE)
    assert (await learner.run_cycle("api")).state == "promoted"
    assert len(vllm.taught) == 2 and "heron" in vllm.taught[1], "the first document is not asked about again"
    data = json.loads((state.root / "jobs" / "v0002.json").read_text())["data"]
    assert [r["messages"][1]["content"] for r in data["augmented"]] == ["A silver heron"]
    assert any(r.get("messages", [{}, {}])[1].get("content") == "Ilse Quorvant" for r in data["knowledge"]), \
        "an earlier document is replayed with its teacher's answers"


async def test_the_teachers_rephrasings_are_trained_as_text_and_asked_for_once(state: StateDir, tiny: Path) -> None:
    vllm, journal = FakeVLLM(), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    learner.settings.augment.forms, learner.settings.augment.teacher_pairs = [], 4  # the teacher's forms alone
    await learner.forms.teach([journal.documents("ready")[0]], vllm, "cld-base")  # an earlier cycle wrote its pairs
    pairs = json.loads((state.teacher / "h1.json").read_text())["pairs"]
    learner.settings.augment.teacher_rephrasings = 2
    record = await learner.run_cycle("api")
    assert record.state == "promoted", (record.reasons, record.error)
    assert len(vllm.taught) == 1 and vllm.rephrased == 1, "only what was not written yet is asked for"
    taught = json.loads((state.teacher / "h1.json").read_text())
    assert taught["pairs"] == pairs and taught["rephrase_asked"] == 4 and taught["rephrase_dropped"] == {"unsupported": 1}
    rephrased = ("In 2031 the city of Tarnhelm saw the Velmora Accord signed, with Ilse Quorvant of Brask as its chief "
                 "negotiator.")
    assert taught["rephrasings"] == [rephrased]
    data = json.loads((state.root / "jobs" / "v0001.json").read_text())["data"]
    assert data["augmented"][-1] == {"text": f"d1\n\n{rephrased}"} and len(data["augmented"]) == 2
    made = json.loads((state.adapters / "v0001" / "meta.json").read_text())["augmentation"]["h1"]
    assert made["teacher"]["rephrasings"] == {"asked": 4, "kept": 1, "dropped": {"unsupported": 1}}
    [view] = adapters_view(state.adapters, learner.cycles, "v0001")
    assert "teacher kept 2 of 8 asked, 1 of 4 rephrasings)" in adapter_line(view)


async def test_a_teacher_that_fails_costs_only_its_questions(state: StateDir, tiny: Path) -> None:
    journal = FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, FakeVLLM(), journal)
    learner.settings.augment.forms, learner.settings.augment.teacher_pairs = [], 4  # the teacher's forms alone
    learner.settings.augment.teacher_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    record = await learner.run_cycle("api")
    assert record.state == "promoted", (record.reasons, record.error)
    assert not state.teacher.exists(), "nothing kept: the next cycle asks again"
    (state.teacher).mkdir()
    (state.teacher / "h1.json").write_text("{broken")
    assert learner.forms.make(journal.documents("learned")[0]).records == [], "an unreadable answer file is not trained on"


async def test_a_forgetting_candidate_is_rejected_and_serving_is_untouched(state: StateDir, tiny: Path) -> None:
    vllm, journal = FakeVLLM(forgetting=0.10), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    record = await learner.run_cycle("api")
    assert record.state == "rejected"
    assert "forgetting vs base +10.0% > +2.0%" in record.reasons
    assert learner.router.current is None and vllm.loaded == {} and len(vllm.unloaded) == 1
    assert journal.docs[1]["state"] == "ready", "rejected documents wait for the next cycle"
    assert (state.adapters / "v0001" / "meta.json").is_file(), "rejected versions stay on disk for inspection"


async def test_a_document_refused_in_too_many_cycles_is_set_aside(state: StateDir, tiny: Path) -> None:
    vllm, journal = FakeVLLM(forgetting=0.10), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    learner.settings.schedule.max_attempts = 2
    first = await learner.run_cycle("api")
    assert first.state == "rejected" and not any("set aside" in r for r in first.reasons)
    second = await learner.run_cycle("api")
    assert second.state == "rejected"
    assert second.reasons[-1] == "d1.txt set aside after 2 refused cycles (`cld retry 1` puts it back)"
    assert journal.docs[1]["set_aside"].startswith("cycle 2 refused its candidate v0002: forgetting vs base +10.0%")
    third = await learner.run_cycle("api")
    assert third.state == "skipped" and third.reasons == ["no new documents"], "it joins no further cycle"


async def test_a_failed_training_leaves_serving_untouched(state: StateDir, tiny: Path, tmp_path: Path) -> None:
    vllm, journal = FakeVLLM(), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    learner.model_dir = tmp_path / "missing-model"
    record = await learner.run_cycle("api")
    assert record.state == "failed" and record.error and record.error.startswith("train: the trainer exited")
    assert learner.router.current is None and vllm.loaded == {}
    assert [p.name for p in state.adapters.iterdir()] == []
    assert (state.logs / "train-v0001.log").read_text(), "the trainer's log is kept"


async def test_rollback_to_the_base_and_back(state: StateDir, tiny: Path) -> None:
    vllm, journal = FakeVLLM(), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    await learner.run_cycle("api")
    await learner.rollback(None)
    assert learner.router.current is None and vllm.loaded == {}
    adapter = await learner.rollback("v0001")
    assert adapter is not None and learner.router.current == adapter
    assert Router("cld", "cld-base", state.serving).current == adapter, "the choice survives a restart"
    with pytest.raises(ValueError, match="no adapter version 'v0009'"):
        await learner.rollback("v0009")
    elsewhere = state.root.parent / "elsewhere"
    (elsewhere / "adapters" / "v0001").mkdir(parents=True)
    for hostile in (str(state.adapters / "v0001"), "../../elsewhere/adapters/v0001", "v0001/..", "v1"):
        with pytest.raises(ValueError, match="is not an adapter version"):
            await learner.rollback(hostile)
    assert Router("cld", "cld-base", state.serving).current == adapter, "nothing hostile was served"


class SlowProbes(FakeVLLM):
    """Probing a candidate waits until `go` is set, so a rollback can arrive mid-probe."""

    def __init__(self) -> None:
        super().__init__()
        self.go, self.probing = asyncio.Event(), asyncio.Event()
        self.broken: set[str] = set()  # versions whose adapter vLLM refuses

    async def token_nll(self, model: str, text: str | list[int]) -> list[float]:
        if model not in ("cld-base", *self.served_before):
            self.probing.set()
            await self.go.wait()
        return await super().token_nll(model, text)

    async def load_lora(self, name: str, path: Path) -> None:
        if path.name in self.broken:
            raise RuntimeError(f"vLLM refused adapter {name} from {path}: no")
        await super().load_lora(name, path)

    served_before: tuple[str, ...] = ()


async def test_a_rollback_during_a_cycle_stops_the_cycle_and_serves_the_version(state: StateDir, tiny: Path) -> None:
    """The candidate was built on the version rolled back from and would undo the rollback if
    promoted; a merged one also holds the instance slot the rolled-back version needs (it was 500
    "cld failed: RuntimeError"). The cycle stops, its candidate is unloaded, its documents wait."""
    vllm, journal = SlowProbes(), FakeJournal()
    vllm.go.set()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    assert (await learner.run_cycle("api")).state == "promoted"
    await learner.rollback(None)
    assert (await learner.rollback("v0001")).version == "v0001"  # v0001 serves; its name is new
    vllm.served_before, vllm.go, vllm.probing = (learner.router.current.served_name,), asyncio.Event(), asyncio.Event()
    journal.add(MORE)
    learner.request("api")
    await asyncio.wait_for(vllm.probing.wait(), 60)
    candidate = next(name for name in vllm.loaded if "v0002" in name)
    adapter = await learner.rollback(None)
    assert adapter is None and learner.router.current is None and learner.task.done()
    record = learner.cycles.all()[-1]
    assert record.state == "failed" and record.error == "cancelled: rolled back to the base while it ran"
    assert candidate in vllm.unloaded and vllm.loaded == {}, "the candidate and the old version are unloaded"
    assert journal.docs[2]["state"] == "ready" and journal.docs[2]["attempts"] == 0, "its document waits, not refused"
    assert not (state.adapters / "v0002").exists() or record.version == "v0002"


async def test_a_version_vllm_cannot_load_leaves_what_serves(state: StateDir, tiny: Path) -> None:
    vllm, journal = SlowProbes(), FakeJournal()
    vllm.go.set()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    assert (await learner.run_cycle("api")).state == "promoted"
    served = learner.router.current
    vllm.broken.add("v0001")
    await learner.rollback(None)
    with pytest.raises(CannotServe, match=r"v0001 could not be served, the base still serves: vLLM refused adapter"):
        await learner.rollback("v0001")
    assert learner.router.current is None and served is not None


async def served_by_another_method(state: StateDir, tiny: Path, vllm: FakeVLLM) -> tuple[Learner, FakeJournal]:
    """A learner (lora) whose served v0001 learned FACTS with another train.method (as its
    meta.json says, as a state written before the method changed would), and MORE handed in."""
    journal = FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    assert (await learner.run_cycle("api")).state == "promoted"
    meta = json.loads((state.adapters / "v0001" / "meta.json").read_text())
    (state.adapters / "v0001" / "meta.json").write_text(json.dumps({**meta, "method": "expand"}))
    journal.add(MORE)
    return learner, journal


async def test_after_a_change_of_method_the_served_documents_are_learned_again_from_the_base(
        state: StateDir, tiny: Path) -> None:
    """A version of another method cannot be continued: the next run starts from the base with
    what the served lineage had learned among its new documents, is probed on all of them, and
    its earlier facts stay retention probes after it."""
    vllm = FakeVLLM()
    learner, journal = await served_by_another_method(state, tiny, vllm)
    record = await learner.run_cycle("api")
    assert record.state == "promoted", (record.reasons, record.error)
    assert (record.documents, record.relearned, record.parent) == ([2], [1], None)
    job = json.loads((state.root / "jobs" / "v0002.json").read_text())
    assert job["parent_path"] is None and {"text": FACTS} in job["data"]["new"], "trained again as new, from the base"
    assert not any(r.get("text") == FACTS for r in job["data"]["knowledge"]), "not also as knowledge replay"
    per_document = learner.settings.probes.cloze_per_document
    cuts = learner.settings.probes.cloze_cuts
    assert record.cloze and len(record.cloze) == (len(build_cloze(FACTS, per_document, cuts=cuts))
                                                  + len(build_cloze(MORE, per_document, cuts=cuts)))
    meta = json.loads((state.adapters / "v0002" / "meta.json").read_text())
    assert (meta["documents"], meta["relearned"], meta["parent"]) == (["h2"], ["h1"], None)
    assert [journal.docs[i]["version"] for i in (1, 2)] == ["v0002", "v0002"]
    view = {a["version"]: a for a in adapters_view(state.adapters, learner.cycles, "v0002")}
    assert adapter_line(view["v0002"]).startswith("v0002  promoted  parent base   1 docs + 1 learned again (+")
    assert "augmented records)  cloze 100%, answered " in adapter_line(view["v0002"])
    assert [r for r in job["data"]["augmented"] if "Velmora" in r["messages"][1]["content"]], \
        "the document learned again comes with its forms"

    ferry = "The Odrin ferry crosses the Sael estuary twice a day. Its captain in 2032 was Rhea Valdomir."
    vllm.learn(ferry)
    journal.add(ferry)
    third = await learner.run_cycle("api")
    assert (third.state, third.parent, third.relearned) == ("promoted", "v0002", []), third.reasons
    assert any(r.startswith("earlier facts the serving version recalls kept") and "= 1.00" in r
               for r in third.reasons), third.reasons
    assert len(retention_probes(learner._lineage())) == len(record.cloze) + len(third.cloze)


async def test_a_refused_change_of_method_counts_against_the_new_documents_only(state: StateDir, tiny: Path) -> None:
    vllm = FakeVLLM()
    learner, journal = await served_by_another_method(state, tiny, vllm)
    vllm.forgetting = 0.10
    record = await learner.run_cycle("api")
    assert (record.state, record.relearned) == ("rejected", [1])
    assert learner.router.current is not None and learner.router.current.version == "v0001"
    assert (journal.docs[1]["state"], journal.docs[1]["version"], journal.docs[1]["attempts"]) == ("learned", "v0001", 0)
    assert (journal.docs[2]["state"], journal.docs[2]["attempts"]) == ("ready", 1)


async def test_a_cycle_ending_deletes_the_weights_of_merged_versions_beyond_keep_merged(state: StateDir, tiny: Path) -> None:
    from tests.test_merged import merged_version

    cycles = CycleStore(state.root / "cycles")
    for number in (1, 2, 3):
        merged_version(state.adapters, f"v000{number}")
        cycles.save(CycleRecord(id=number, trigger="api", state="promoted", version=f"v000{number}"))
    journal = FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, FakeVLLM(), journal)
    learner.settings.state.keep_merged = 1
    learner.rolling_back.add("v0001")  # a rollback is loading it
    record = await learner.run_cycle("api")
    assert (record.state, record.version) == ("promoted", "v0004"), (record.reasons, record.error)
    view = adapters_view(state.adapters, learner.cycles, "v0004")
    assert {a["version"]: bool(a["pruned_at"]) for a in view} == {"v0001": False, "v0002": True, "v0003": False,
                                                                  "v0004": False}
    assert "weights deleted" in adapter_line(view[1]) and "weights deleted" not in adapter_line(view[0])
    with pytest.raises(ValueError, match="v0002: its weights were deleted"):
        await learner.rollback("v0002")
    assert learner.router.current is not None and learner.router.current.version == "v0004"


def test_serving_json_never_points_outside_the_state_directory(tmp_path: Path) -> None:
    serving = tmp_path / "serving.json"
    serving.write_text('{"current": {"version": "v0002", "served_name": "cld-v0002-ab", "path": "/etc"}}')
    assert Router("cld", "cld-base", serving).current.path == tmp_path / "adapters" / "v0002"
    for damaged in ('{"current": {"version": "/etc", "served_name": "x", "path": "/etc"}}', '{"current": 5}', "{"):
        serving.write_text(damaged)
        with pytest.raises(DamagedFile, match=f"{serving} is damaged"):
            Router("cld", "cld-base", serving)


def test_a_cycle_interrupted_by_a_crash_is_resolved_at_start(tmp_path: Path) -> None:
    store = CycleStore(tmp_path)
    store.save(CycleRecord(id=1, trigger="api", state=RUNNING, stage="promote", version="v0001"))
    store.save(CycleRecord(id=2, trigger="api", state=RUNNING, stage="train", version="v0002"))
    closed = {r.id: r.state for r in store.resolve_interrupted(serving_version="v0001")}
    assert closed == {1: "promoted", 2: "failed"}
    assert "interrupted at stage 'train'" in (store.all()[1].error or "")


async def test_the_trainer_runs_below_the_daemons_cpu_priority(tmp_path: Path) -> None:
    import os

    import psutil

    from daemon.learning.cycle import TRAIN_NICENESS, TRAINER_ENV, start_trainer

    job_file = tmp_path / "v0001.json"
    job_file.write_text("{}")  # the priority is set before the trainer reads anything
    with open(tmp_path / "train.log", "wb") as log:
        process = await start_trainer(job_file, log)
        try:
            assert psutil.Process(process.pid).nice() == min(19, os.nice(0) + TRAIN_NICENESS)
            environ = psutil.Process(process.pid).environ()
            assert all(environ.get(key) == value for key, value in TRAINER_ENV.items()), "OpenMP threads must not spin"
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


def test_trainer_threads_spin_briefly_only_while_serving_is_quiet(state: StateDir, tiny: Path) -> None:
    from daemon.learning.cycle import QUIET_S, SHORT_SPIN_ENV, TRAINER_ENV, trainer_env

    learner = make(state, tiny, FakeVLLM(), FakeJournal())
    router = learner.router
    router.last_active -= QUIET_S + 1
    assert learner.thread_policy() == SHORT_SPIN_ENV
    router.begin("cld-base")
    assert router.idle_s() == 0 and learner.thread_policy() == TRAINER_ENV, "a request in flight: sleep"
    router.end("cld-base")
    assert learner.thread_policy() == TRAINER_ENV, "a request just ended: sleep"
    router.last_active -= QUIET_S + 1
    learner.settings.train.thread_wait = "sleep"
    assert learner.thread_policy() == TRAINER_ENV
    learner.settings.train.thread_wait = "short-spin"
    router.begin("cld-base")
    assert learner.thread_policy() == SHORT_SPIN_ENV
    assert trainer_env({"PATH": "/bin"}, SHORT_SPIN_ENV) == {"PATH": "/bin", **SHORT_SPIN_ENV}
    assert trainer_env({"OMP_WAIT_POLICY": "ACTIVE"}, TRAINER_ENV) == {"OMP_WAIT_POLICY": "ACTIVE"}, \
        "the operator's setting wins"


async def test_a_lineage_promoted_between_the_limits_keeps_learning(state: StateDir, tiny: Path) -> None:
    """Issue 31's stall: v0001 promoted completing 4 of 6 of its cloze probes (between
    min_cloze_pass 0.5 and min_retention 0.8). A candidate that keeps all 4 used to be refused
    ("retention of earlier facts 0.67 < 0.80") in every later cycle; now it is held only to those 4.
    A candidate that loses them is refused, and `cld adapters` names what it lost."""
    from daemon.cli import refusal_lines

    vllm, journal = FakeVLLM(), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    prompts = [c.prompt for c in build_cloze(FACTS, 16, cuts=learner.settings.probes.cloze_cuts)]
    assert len(prompts) == 6
    vllm.unknown = set(prompts[::3])  # the served version never completes these two
    first = await learner.run_cycle("api")
    assert first.state == "promoted" and first.probes["results"]["cloze_pass"] == pytest.approx(4 / 6)

    journal.add(MORE)
    second = await learner.run_cycle("api")
    results = second.probes["results"]
    assert results["earlier_recalled"] == pytest.approx(4 / 6), "below 0.8: the old absolute rule refused this"
    assert (second.state, results["retention"], results["retention_items"]) == ("promoted", 1.0, 4), second.reasons

    vllm.forgets = set(prompts) - vllm.unknown
    journal.add("The Sael estuary ferry was rebuilt in 2033 by the shipwrights of Odrin. Its new hull is oak.")
    vllm.learn(journal.docs[3]["text"])
    third = await learner.run_cycle("api")
    assert third.state == "rejected"
    failed = [f["probe"] for f in third.failed]
    assert failed == ["retention"], third.failed
    view = {a["version"]: a for a in adapters_view(state.adapters, learner.cycles, "v0002")}["v0003"]
    lines = refusal_lines(view)
    assert lines[0].startswith("refused: earlier facts the serving version recalls kept 3 of 7 = 0.43 (at most"), lines
    assert sum(line.startswith("lost: ") for line in lines) == 4
    assert any(FACTS.split()[-1].rstrip(".") in line for line in lines[1:]), lines


def test_a_cycle_learns_documents_refused_fewer_times_first_within_its_token_budget(state: StateDir, tiny: Path) -> None:
    """A document that keeps being refused never lengthens every later cycle: fresh documents go
    first, and no cycle learns more than schedule.max_cycle_tokens (one larger document alone)."""
    from daemon.learning.cycle import within_budget

    journal = FakeJournal()
    for text in (FACTS, MORE, FACTS + " " + MORE):
        journal.add(text)
    journal.docs[1]["attempts"] = 2
    learner = make(state, tiny, FakeVLLM(), journal)
    learner.settings.schedule.max_cycle_tokens = 40
    assert [d["id"] for d in learner.new_documents()] == [2], "doc 1 was refused twice: it waits; 2 + 3 > 40 tokens"
    learner.settings.schedule.max_cycle_tokens = 0
    assert [d["id"] for d in learner.new_documents()] == [2, 3, 1]
    docs = [{"id": 1, "tokens": 500}, {"id": 2, "tokens": 10}]
    assert within_budget(docs, 100) == docs[:1], "a document over the budget is learned alone"
    assert within_budget(docs, 510) == docs


def test_a_record_written_by_another_version_is_read_and_a_broken_one_left_out(tmp_path: Path) -> None:
    store = CycleStore(tmp_path)
    store.finish(store.begin("api"), "promoted", ["ok"])
    (tmp_path / "000002.json").write_text(json.dumps({**asdict(store.all()[0]), "id": 2, "from_the_future": 1}))
    (tmp_path / "000003.json").write_text(json.dumps({"trigger": "api"}))  # no id
    (tmp_path / "000004.json").write_text(json.dumps({"id": "four", "trigger": "api"}))
    assert [record.id for record in store.all()] == [1, 2]
    assert store.begin("api").id == 5  # after every file: one it cannot read is not overwritten


async def test_a_cycle_trains_on_two_processes_when_asked(state: StateDir, tiny: Path) -> None:
    """train.devices = 2: the same cycle, its trainer under torchrun (2 gloo processes here)."""
    vllm, journal = FakeVLLM(), FakeJournal()
    journal.add(FACTS)
    learner = make(state, tiny, vllm, journal)
    learner.settings.train.grad_accum, learner.settings.train.devices = 2, 2
    record = await learner.run_cycle("api")
    assert record.state == "promoted", (record.reasons, record.error)
    meta = json.loads((state.adapters / "v0001" / "meta.json").read_text())
    assert meta["training"]["processes"] == 2 and record.progress["steps"] == meta["training"]["steps"]

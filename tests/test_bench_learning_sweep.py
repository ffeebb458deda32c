"""The GPU recipe sweep (bench/learning/sweep.py) on a tiny model: its transformers-side measures
agree with the model's own loss and with unbatched decoding, and a run trains and scores cycles."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from daemon.learning import teacher
from tests.tiny import build_tiny_model

spec = importlib.util.spec_from_file_location("bench_sweep", Path(__file__).parent.parent / "bench" / "learning" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sweep
spec.loader.exec_module(sweep)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def scorer(tiny: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.padding_side = "left"
    return sweep.Scorer(AutoModelForCausalLM.from_pretrained(tiny).eval(), tokenizer, batch=3)


def test_token_nll_is_the_models_loss_whatever_the_batch(scorer) -> None:
    import torch

    texts = ["The quick brown fox jumps over the lazy dog.", "Zorblat is the capital", "Tokens make documents."]
    ids = [scorer.tok(t)["input_ids"] for t in texts]
    batched = scorer.token_nll(ids)
    assert [len(row) for row in batched] == [len(i) - 1 for i in ids]  # every token but the first
    for row, one in zip(batched, ids):
        with torch.no_grad():
            loss = scorer.model(input_ids=torch.tensor([one]), labels=torch.tensor([one])).loss.item()
        assert sum(row) / len(row) == pytest.approx(loss, rel=1e-4)


def test_answer_nll_counts_the_answer_tokens_only(scorer) -> None:
    prompt, answer = "What is the capital of France?", "The capital of France is Paris."
    head = scorer._chat([{"role": "user", "content": prompt}], True)
    full = scorer._chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], False)
    values = scorer.token_nll([full])[0][len(head) - 1:]
    assert len(values) == len(full) - len(head)
    assert scorer.answer_nll([[prompt, answer]]) == pytest.approx(sum(values) / len(values))


def test_left_padded_batches_decode_as_one_prompt_at_a_time(scorer) -> None:
    prompts = ["The quick", "Zorblat is the capital of the planet", "What is", "Tokens, sentences and"]
    ids = [scorer.tok(p)["input_ids"] for p in prompts]
    limits = [5, 3, 8, 6]
    assert scorer.generate(ids, limits) == [scorer.generate([i], [n])[0] for i, n in zip(ids, limits)]
    assert all("\n" not in text for text in scorer.complete(prompts, limits))


def test_a_run_trains_each_cycle_and_scores_what_it_learned(tiny: Path, tmp_path: Path) -> None:
    documents, _ = sweep.measure.load_documents()
    chunk = {"text": "Zorblat is the capital of the planet Quux, founded in 2071."}
    job = {"new": [chunk] * 3, "replay": [{"kind": "corpus", "text": "The quick brown fox jumps."}],
           "knowledge": [{"kind": "knowledge", "text": "Tokens make documents."}],
           "rehearsal": [{"kind": "rehearsal", "messages": [{"role": "user", "content": "What is the capital?"},
                                                               {"role": "assistant", "content": "Paris."}]}]}
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"documents": [d.name for d in documents], "jobs": {"4.0": [job] * len(documents)},
                                "held_out": ["The lazy dog sleeps."], "behaviour": [["Hi?", "Hello."]],
                                "drift": ["Tell me a joke."]}))
    grid = tmp_path / "grid.json"
    recipe = {"cycles": 2, "documents": [4], "max_steps": 2, "seq_len": 32, "dtype": "fp32"}
    grid.write_text(json.dumps([{"name": "tiny", **recipe},
                                {"name": "added", "method": "expand", "expand_blocks": 1, **recipe}]))
    out = tmp_path / "results.json"
    sweep.run(data, tiny, grid, out)
    found = json.loads(out.read_text())
    result, added = found["results"]
    assert added["recipe"] == "added" and len(added["steps"]) == 2
    assert added["steps"][1]["held_out_delta"] != 0.0  # the added block trained (it starts as the identity)
    assert added["trainable_parameters"] != result["trainable_parameters"] > 0
    assert result["recipe"] == "tiny" and result["first_document"] == 4
    assert [s["document"] for s in result["steps"]] == [documents[4].name, documents[5].name]
    first, second = result["steps"]
    assert first["steps"] == second["steps"] == 2
    assert second["first_cloze"] == first["this_cloze"] == 0.0  # a tiny model knows none of the facts
    assert second["held_out_delta"] != 0.0  # trained: the held-out NLL moved
    assert found["general_base"] == 0 and 0.0 <= second["drift_agreement"] <= 1.0

    table = sweep.report([out], tmp_path / "methods.png").splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| tiny | 1 |") and table[-1].startswith("| added | 2 |")
    assert (tmp_path / "methods.png").stat().st_size > 10_000


def test_a_lifelong_runs_jobs_export_cycle_by_cycle(tmp_path: Path) -> None:
    from replay import build
    from replay.job import BuildJob
    from tests.replay_helpers import BagOfWords, use_embedder, write_topic_corpus

    run = tmp_path / "run"
    (run / "state" / "jobs").mkdir(parents=True)
    write_topic_corpus(tmp_path / "corpus", per_topic=8)
    build.run(BuildJob(folder=run / "state" / "replay", corpus=[tmp_path / "corpus"],
                       embedder=use_embedder(BagOfWords()).name, passage_tokens=24, held_out_fraction=0.25))
    names = ["tidewell-4.2-release-notes.md", "prek-readme.md", "django-bolt-readme.md"]
    (run / "results.json").write_text(json.dumps({"steps": [{"cycle": k + 1, "document": n} for k, n in enumerate(names)]}))
    for k, documents in enumerate([["a"], ["b"], ["b", "c"]]):
        data = {"new": [{"text": f"chunk of {documents[-1]}"}], "replay": [], "knowledge": [], "rehearsal": []}
        (run / "state" / "jobs" / f"v{k + 1:04d}.json").write_text(json.dumps({"documents": documents, "data": data}))
    out = tmp_path / "run-data.json"
    sweep.export_run(run, out, cycles=2, held_out=4)
    found = json.loads(out.read_text())
    assert found["documents"] == names[:2]
    assert [job["new"][0]["text"] for job in found["jobs"]["run"]] == ["chunk of a", "chunk of b"]
    assert len(found["held_out"]) == 4 and found["drift"]
    assert set(found["documents"]) <= set(sweep.known_documents())
    with pytest.raises(SystemExit, match="cycle 3 trained 2 documents"):
        sweep.export_run(run, out, cycles=3, held_out=4)


def test_open_book_asks_each_question_with_and_without_its_document() -> None:
    spec = importlib.util.spec_from_file_location("bench_open_book", Path(sweep.__file__).parent / "open_book.py")
    open_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(open_book)
    [doc, *_] = sweep.known_documents().values()

    class Reader:  # answers only what it is shown
        def chat(self, questions: list[str], max_tokens: int) -> list[str]:
            return [next((f.qa_answer for f in doc.facts if f.question in q and doc.text.strip() in q), "no idea")
                    for q in questions]

    [row] = open_book.measure_documents(Reader(), [doc])
    assert row["closed"] == 0.0 and row["open"] == 1.0 and len(row["answers"]) == len(doc.facts)


def test_teach_adds_the_teachers_pairs_to_every_job(tiny: Path, tmp_path: Path) -> None:
    names = list(sweep.known_documents())[:2]
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"documents": names, "jobs": {"run": [{"new": [], "augmented": [{"text": "kept"}]}, {}]}}))
    out = tmp_path / "taught.json"
    sweep.teach(data, tiny, out, pairs=2, temperature=0.8)
    taught = json.loads(out.read_text())
    assert set(taught["teacher"]) == set(names)
    for name, job in zip(names, taught["jobs"]["run"]):
        asked = taught["teacher"][name]
        assert asked["asked"] > 0 and sum(asked["dropped"].values()) + len(asked["pairs"]) >= 1
        added = teacher.records(asked["pairs"])
        assert job["augmented"][len(job["augmented"]) - len(added):] == added
    assert taught["jobs"]["run"][0]["augmented"][0] == {"text": "kept"}


def test_a_grids_augment_settings_make_the_forms_the_daemon_makes(tmp_path: Path) -> None:
    from daemon.config import AugmentSection

    documents = sweep.measure.load_documents()[0]
    journaled = sweep.as_journaled(documents[0])
    plain = sweep.library(AugmentSection(forms=["quiz"]), documents, tmp_path / "a").of(journaled).records
    read = sweep.library(AugmentSection(forms=["quiz"], context_distill="instead"), documents,
                         tmp_path / "b").of(journaled).records
    assert plain and all("open_book" not in r for r in plain)
    assert [r["messages"] for r in read] == [r["messages"] for r in plain]
    assert all(r["open_book"][0]["content"].startswith("Read this document") for r in read)


def test_the_methods_grid_compares_the_four_methods_with_valid_settings() -> None:
    grid = json.loads((Path(sweep.__file__).parent / "methods.json").read_text())
    recipes = [sweep.parse_recipe(recipe) for recipe in grid]
    assert sorted(hyper.method for *_, hyper, _ in recipes) == ["expand", "full", "lora", "mora"]
    assert {(ratio, cycles) for _, ratio, cycles, *_ in recipes} == {("run", 5)}
    with pytest.raises(ValueError, match="learning_rat"):
        sweep.parse_recipe({"name": "typo", "learning_rat": 1e-3})

"""The embedded model's replay text ships with cld (replay/seed_text): a first start with the shipped
settings embeds it instead of having the model write it for 11-70 minutes; another model or other
settings write their own."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.model import EMBEDDED_NAME
from replay import build, seed
from replay.job import BuildJob

SHIPPED = ["rehearsal.json", "synthetic/corpus.jsonl", "synthetic/meta.json"]


def test_a_build_for_the_embedded_model_with_the_shipped_settings_takes_the_shipped_text(tmp_path: Path) -> None:
    job = BuildJob(folder=tmp_path / "replay", model_id=EMBEDDED_NAME)
    assert seed.plant(job) == SHIPPED
    assert build._synthetic_ready(job) and build._rehearsal_stale(job) is None, "the build asks the model nothing"
    corpus = [json.loads(line) for line in (job.folder / "synthetic" / "corpus.jsonl").read_text().split("\n") if line]
    assert len(corpus) == job.synthetic_documents and all(doc["text"].strip() for doc in corpus)
    pairs = json.loads((job.folder / "rehearsal.json").read_text())["pairs"]
    assert len(pairs) > 100 and 0 < sum(pair["held_out"] for pair in pairs) <= job.rehearsal_held_out
    assert seed.plant(job) == [], "nothing twice"


def test_what_is_there_is_kept_and_a_synthesis_stopped_part_way_is_dropped(tmp_path: Path) -> None:
    job = BuildJob(folder=tmp_path / "replay", model_id=EMBEDDED_NAME)
    (job.folder / "synthetic").mkdir(parents=True)
    (job.folder / "rehearsal.json").write_text("{}")
    (job.folder / "synthetic" / "partial.json").write_text("{}")
    assert seed.plant(job) == SHIPPED[1:]
    assert (job.folder / "rehearsal.json").read_text() == "{}"
    assert not (job.folder / "synthetic" / "partial.json").exists()


def test_another_model_or_other_settings_write_their_own(tmp_path: Path) -> None:
    for job in (BuildJob(folder=tmp_path / "a", model_id="Qwen2.5-0.5B-Instruct"),
                BuildJob(folder=tmp_path / "b", model_id=EMBEDDED_NAME, synthetic_documents=24),
                BuildJob(folder=tmp_path / "c", model_id=EMBEDDED_NAME, rehearsal_prompts=24, rehearsal_held_out=6),
                BuildJob(folder=tmp_path / "d", model_id=EMBEDDED_NAME, seed=7)):
        assert seed.plant(job) == [] and not job.folder.exists()


def test_with_a_corpus_configured_only_the_rehearsal_answers_are_taken(tmp_path: Path) -> None:
    job = BuildJob(folder=tmp_path / "replay", model_id=EMBEDDED_NAME, corpus=[tmp_path / "corpus"])
    assert seed.plant(job) == ["rehearsal.json"]


def test_the_shipped_text_is_package_data() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"replay" = ["seed_text/*.json", "seed_text/synthetic/*"]' in pyproject
    assert {p.name for p in seed.SEED_TEXT.rglob("*") if p.is_file()} == {"made_with.json", "rehearsal.json",
                                                                           "corpus.jsonl", "meta.json"}


def test_a_build_with_the_shipped_text_needs_no_model_server(tmp_path: Path) -> None:
    """So `cld prepare` (and `cld replay build`) make the embedded model's buffer before `cld run`."""
    from tests.replay_helpers import BagOfWords, use_embedder

    embedder = use_embedder(BagOfWords())
    job = BuildJob(folder=tmp_path / "replay", model_id=EMBEDDED_NAME, embedder=embedder.name, passage_tokens=200)
    assert seed.matches(job) and job.generator is None
    built = build.run(job)
    assert built["source"] == "synthetic" and built["passages"] > 400
    assert build.check(job) is None, "up to date"

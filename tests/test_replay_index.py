"""Building the replay buffer: round trip, resume, extension, and rebuild of damaged or mismatched parts."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from replay import build, files, index
from replay.buffer import BufferMissing, ReplayBuffer
from replay.job import BuildJob
from tests.conftest import REPO
from tests.replay_helpers import (
    BagOfWords,
    topic_text,
    use_embedder,
    write_topic_corpus,
)


@pytest.fixture
def embedder() -> BagOfWords:
    return use_embedder(BagOfWords())


@pytest.fixture
def job(tmp_path: Path, embedder: BagOfWords) -> BuildJob:
    write_topic_corpus(tmp_path / "corpus")
    return BuildJob(folder=tmp_path / "replay", corpus=[tmp_path / "corpus"], embedder=embedder.name,
                    passage_tokens=24, held_out_fraction=0.2)


def test_round_trip(job: BuildJob, embedder: BagOfWords) -> None:
    built = build.run(job)
    assert built["passages"] == 60 == embedder.encoded
    assert 0 < built["held_out"] < 30
    assert built["source"] == "corpus" and built["dim"] == embedder.dim
    assert built["indexes"]["train"]["kind"] == "flat"
    assert build.check(job) is None
    buffer = ReplayBuffer.open(job.folder)
    try:
        assert len(buffer.train_ids) + built["held_out"] == 60
        some = buffer.passages(buffer.train_ids[:3])
        for passage in some:
            best = buffer.query(passage.text, 1)[0]
            assert best.passage == passage and best.score == pytest.approx(1.0, abs=1e-5)
        assert buffer.store.vectors(embedder.dim).shape == (60, embedder.dim)
    finally:
        buffer.close()


def test_a_second_run_does_nothing(job: BuildJob, embedder: BagOfWords, caplog) -> None:
    first = build.run(job)
    caplog.set_level(logging.INFO)
    assert build.run(job) == first
    assert embedder.encoded == 60
    assert "is up to date" in caplog.text


def test_open_before_any_build_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(BufferMissing, match="cld replay build"):
        ReplayBuffer.open(tmp_path)


def test_a_new_file_is_only_added(job: BuildJob, embedder: BagOfWords, tmp_path: Path) -> None:
    build.run(job)
    rng = random.Random(7)
    (tmp_path / "corpus" / "new.txt").write_text("\n\n".join(topic_text("owls", rng) for _ in range(5)))
    assert build.check(job) == "the corpus changed"
    built = build.run(job)
    assert built["passages"] == 65 and embedder.encoded == 65
    assert built["generation"] == 2
    assert sorted(p.name for p in job.folder.glob("*.faiss")) == ["held_out-2.faiss", "train-2.faiss"]


def test_a_changed_file_starts_over(job: BuildJob, embedder: BagOfWords, tmp_path: Path, caplog) -> None:
    build.run(job)
    (tmp_path / "corpus" / "cats.txt").write_text("cats0 cats1 cats2 cats3 cats4 cats5 cats6 cats7 cats0 cats1")
    built = build.run(job)
    assert built["passages"] == 51 and embedder.encoded == 60 + 51
    assert "cats.txt changed or is gone: starting over" in caplog.text


def test_another_embedder_rebuilds_with_a_clear_reason(job: BuildJob, caplog) -> None:
    build.run(job)
    other = use_embedder(BagOfWords("test-bow-small", dim=32))
    job.embedder = other.name
    assert "settings changed" in build.check(job)
    caplog.set_level(logging.INFO)
    built = build.run(job)
    assert built["dim"] == 32 and other.encoded == 60
    assert "settings changed" in caplog.text and "starting over" in caplog.text
    assert ReplayBuffer.open(job.folder).train_index.d == 32


def test_a_damaged_index_file_is_rebuilt_without_embedding_again(job: BuildJob, embedder: BagOfWords, caplog) -> None:
    built = build.run(job)
    path = job.folder / built["indexes"]["train"]["file"]
    path.write_bytes(b"\0" * path.stat().st_size)  # same size: only loading it tells
    assert build.check(job) is None
    caplog.set_level(logging.INFO)
    rebuilt = build.run(job)
    assert "does not load" in caplog.text
    assert embedder.encoded == 60 and rebuilt["generation"] == 2
    ReplayBuffer.open(job.folder).close()


@pytest.mark.parametrize("damage", ["manifest", "truncated index", "database"])
def test_damaged_parts_are_detected_and_rebuilt(job: BuildJob, damage: str, caplog) -> None:
    built = build.run(job)
    if damage == "manifest":
        (job.folder / files.MANIFEST_FILE).write_text("{not json")
        assert build.check(job) == "manifest unreadable"
    elif damage == "truncated index":
        path = job.folder / built["indexes"]["held_out"]["file"]
        path.write_bytes(path.read_bytes()[:100])
        assert "missing or damaged" in build.check(job)
    else:
        (job.folder / files.MANIFEST_FILE).unlink()
        (job.folder / files.PASSAGES_FILE).write_bytes(b"garbage" * 1000)
    again = build.run(job)
    assert again["passages"] == 60
    buffer = ReplayBuffer.open(job.folder)
    assert len(buffer.passages(buffer.train_ids)) == len(buffer.train_ids) == 60 - again["held_out"]
    buffer.close()
    if damage == "database":
        assert "damaged" in caplog.text and "starting over" in caplog.text


def test_an_interrupted_build_resumes_where_it_stopped(job: BuildJob, embedder: BagOfWords,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "EMBED_BATCH", 16)
    stop = threading.Event()
    encode = embedder.encode

    def encode_then_stop(texts):
        stop.set()
        return encode(texts)

    monkeypatch.setattr(embedder, "encode", encode_then_stop)
    with pytest.raises(build.Stopped):
        build.run(job, stop)
    assert embedder.encoded == 16 and files.read_manifest(job.folder) is None
    # A crash mid-write leaves part of a row behind: it is cut off.
    with open(job.folder / files.EMBEDDINGS_FILE, "ab") as handle:
        handle.write(b"\1" * 100)
    monkeypatch.setattr(embedder, "encode", encode)
    built = build.run(job)
    assert embedder.encoded == 60 and built["passages"] == 60
    buffer = ReplayBuffer.open(job.folder)
    texts = [p.text for p in buffer.store.get(range(1, 61))]
    assert np.allclose(buffer.store.vectors(embedder.dim), BagOfWords().encode(texts))
    buffer.close()


def test_one_build_at_a_time(job: BuildJob) -> None:
    with files.build_lock(job.folder), pytest.raises(files.BuildLocked, match="another process"):
        build.run(job)


def test_job_round_trips_through_json(job: BuildJob) -> None:
    assert BuildJob.from_json(job.to_json()) == job


def clustered(count: int, dim: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim)).astype(np.float32)
    points = middle[rng.integers(0, centres, count)] + 0.3 * rng.standard_normal((count, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_large_sets_get_a_tuned_ivf_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index, "EXACT_MAX", 1_000)
    points = clustered(6_100, 32, 40, seed=0)
    vectors, queries = points[:6_000], points[6_000:]  # queries from the same distribution, not indexed
    ids = np.arange(1, 6_001, dtype=np.int64)
    built = index.build(lambda wanted: vectors[wanted - 1], ids, 32)
    assert built.kind == f"ivf{index.lists_for(6_000)}" and 1 <= built.nprobe < built.index.nlist
    _, found = index.search(built.index, queries, 16)
    truth = index.exact_neighbours(lambda wanted: vectors[wanted - 1], ids, queries, 16)
    assert index.recall(found, truth, None, 16) >= 0.9


def test_index_save_and_load_keep_ids_and_nprobe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index, "EXACT_MAX", 100)
    vectors = clustered(2_000, 16, 10, seed=2)
    ids = np.arange(1, 2_001, dtype=np.int64) * 3
    built = index.build(lambda wanted: vectors[wanted // 3 - 1], ids, 16)
    index.save(built.index, tmp_path / "x.faiss")
    loaded = index.load(tmp_path / "x.faiss", nprobe=built.nprobe)
    assert loaded.nprobe == built.nprobe
    _, found = index.search(loaded, vectors[:5], 1)
    assert list(found[:, 0]) == [3, 6, 9, 12, 15]


def test_unknown_embedder_names_the_valid_ones_and_the_folder_option(tmp_path: Path) -> None:
    from replay.embed import DEFAULT_EMBEDDER, load_embedder

    with pytest.raises(ValueError, match=f"unknown embedder 'nope' \\(valid: .*{DEFAULT_EMBEDDER}.*encoder folder"):
        load_embedder("nope")


def test_embedders_loaded_by_threads_at_once_all_load() -> None:
    """Recall's embedder and a cycle's load in threads of the daemon, at times together. In a fresh
    process (transformers not yet imported) four threads loading at once: transformers' lazy import
    is not thread-safe, and one of them failed with "no attribute 'AutoTokenizer'" before loads took
    turns."""
    script = textwrap.dedent("""
        import threading
        from replay.embed import load_embedder
        errors = []
        def load():
            try:
                load_embedder("all-MiniLM-L6-v2")
            except Exception as error:
                errors.append(repr(error))
        threads = [threading.Thread(target=load) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(errors)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", (done.stdout, done.stderr[-2000:])

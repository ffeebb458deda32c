"""Build the replay buffer: corpus (configured or synthesized) → passages → vectors → indexes.

    python -m replay.build JOB.json      # what the daemon runs, in its own process

Owns the order of the stages and the manifest. Every stage resumes: corpus files already read are
skipped (a partly read one continues at its last committed passage), only passages without a
vector are embedded, so an interrupted build continues and a grown corpus is only extended. A
damaged or mismatched buffer (other embedder or cutting settings, a corpus file changed or gone,
an index file that does not load) is detected, logged with the reason and rebuilt. The manifest is
written last: readers see the previous complete buffer or the new one, never a half-built one.
Knows nothing of the daemon: the job says everything.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from replay import corpus, files, index, seed, synth
from replay.durable import atomic_write_json, atomic_write_jsonl, read_json
from replay.embed import Embedder, load_embedder
from replay.job import BuildJob
from replay.store import PassageStore

log = logging.getLogger(__name__)

COMMIT_EVERY = 1_000  # passages read between commits (the resume granularity)
EMBED_BATCH = 256  # passages embedded between commits
LOG_EVERY_S = 30.0


class BuildError(RuntimeError):
    """The buffer cannot be built; the message says what to change."""


class Stopped(Exception):
    """The build was asked to stop; the next one resumes where this one left off."""


# ---- checking -------------------------------------------------------------------------------


def check(job: BuildJob) -> str | None:
    """Why the buffer must be (re)built or extended, or None when it is up to date. Cheap: no loading."""
    if job.generator is not None and (reason := _rehearsal_stale(job)):
        return reason
    return _index_stale(job)


def _index_stale(job: BuildJob) -> str | None:
    found = files.read_manifest(job.folder)
    if found is None:
        return "no replay buffer yet" if not (job.folder / files.MANIFEST_FILE).exists() else "manifest unreadable"
    if found["settings"] != job.cut_settings:
        return f"settings changed (built with {found['settings']}, configured {job.cut_settings})"
    if not job.corpus and not _synthetic_ready(job):
        return "no synthetic corpus for this base model yet"
    try:
        sources = _corpus_files(job)
    except corpus.CorpusError as error:
        return str(error)
    if found["fingerprint"] != corpus.fingerprint(sources, job.cut_settings):
        return "the corpus changed"
    return _missing_file(job.folder, found)


def _missing_file(folder: Path, found: dict[str, Any]) -> str | None:
    for part in found["indexes"].values():
        path = folder / part["file"]
        if not path.is_file() or path.stat().st_size != part["bytes"]:
            return f"index file {path.name} is missing or damaged"
    return None


def _damaged_index(folder: Path, found: dict[str, Any]) -> str | None:
    """Load each index of a published buffer: one that does not load or holds the wrong count is damaged."""
    for part in found["indexes"].values():
        try:
            loaded = index.load(folder / part["file"])
        except RuntimeError as error:
            return f"index file {part['file']} does not load ({str(error).splitlines()[0]})"
        if loaded.ntotal != part["count"]:
            return f"index file {part['file']} holds {loaded.ntotal} vectors, the manifest says {part['count']}"
    return None


# ---- running --------------------------------------------------------------------------------


def run(job: BuildJob, stop: threading.Event | None = None, progress: bool = False) -> dict[str, Any]:
    """Bring the buffer up to date; return its manifest. Raises BuildError, Stopped, BuildLocked."""
    stop = stop or threading.Event()
    with files.build_lock(job.folder), _progress_cleared(job.folder):
        seed.plant(job)  # the embedded model's own text, shipped: nothing to ask it
        if job.generator is not None and _rehearsal_stale(job):
            try:
                make_rehearsal(job, job.generator, stop)
            except synth.GeneratorUnavailable as error:  # the corpus part need not wait for it
                log.warning("no behaviour rehearsal pairs this time: %s", error)
        if not job.corpus and not _synthetic_ready(job):
            make_synthetic_corpus(job, stop)
        reason = _index_stale(job) or _damaged_index(job.folder, files.read_manifest(job.folder))
        if reason is None:
            found = files.read_manifest(job.folder)
            log.info("replay buffer in %s is up to date (%d passages)", job.folder, found["passages"])
            return found
        log.info("building the replay buffer in %s: %s", job.folder, reason)
        return _build(job, stop, progress)


@contextlib.contextmanager
def _progress_cleared(folder: Path) -> Iterator[None]:
    """No progress is shown once the build ends, however it ends (the next one reports anew)."""
    try:
        yield
    finally:
        files.clear_progress(folder)


def _build(job: BuildJob, stop: threading.Event, progress: bool) -> dict[str, Any]:
    sources = _corpus_files(job)
    store = _open_store(job, sources)
    try:
        embedder = load_embedder(job.embedder)
        _read_corpus(store, sources, job, embedder, stop)
        _embed_pending(store, embedder, stop, progress)
        return _publish(store, job, sources, embedder.dim)
    finally:
        store.close()


def _corpus_files(job: BuildJob) -> list[Path]:
    if job.corpus:
        return corpus.source_files(job.corpus)
    return [job.folder / files.SYNTHETIC_DIR / files.SYNTHETIC_CORPUS_FILE]


def _open_store(job: BuildJob, sources: list[Path]) -> PassageStore:
    """The passage store, emptied first when it is damaged or was cut from something else."""
    try:
        store = PassageStore(job.folder)
        store.check()
        reason = _stale_store(store, job, sources)
    except sqlite3.DatabaseError as error:
        store, reason = None, f"the passage database is damaged ({error})"
    if reason is not None:
        log.warning("replay buffer in %s: %s: starting over", job.folder, reason)
        if store is not None:
            store.close()
        _remove_store(job.folder)
        store = PassageStore(job.folder)
    store.set_meta("settings", job.cut_settings)
    return store


def _stale_store(store: PassageStore, job: BuildJob, sources: list[Path]) -> str | None:
    settings = store.meta("settings")
    if settings is not None and settings != job.cut_settings:
        return f"settings changed (cut with {settings})"
    current = {str(path): path for path in sources}
    for name, row in store.sources().items():
        if name not in current or corpus.file_stamp(current[name]) != (row.size, row.mtime_ns):
            return f"corpus file {name} changed or is gone"
    return None


def _remove_store(folder: Path) -> None:
    for name in (files.PASSAGES_FILE, f"{files.PASSAGES_FILE}-wal", f"{files.PASSAGES_FILE}-shm",
                 files.EMBEDDINGS_FILE, files.MANIFEST_FILE):
        (folder / name).unlink(missing_ok=True)
    for path in folder.glob(f"*{files.INDEX_SUFFIX}"):
        path.unlink()


def _read_corpus(store: PassageStore, sources: list[Path], job: BuildJob, embedder: Embedder,
                 stop: threading.Event) -> None:
    done = store.sources()
    for path in sources:
        row = done.get(str(path))
        if row is not None and row.complete:
            continue
        position = row.position if row else 0
        stamp = corpus.file_stamp(path)
        stream = islice(corpus.passages(path, job.text_field, embedder.spans, job.passage_tokens), position, None)
        for batch, last in _batches(stream, COMMIT_EVERY):
            position += len(batch)
            store.add_passages(str(path), stamp, batch, position, last, job.held_out_fraction)
            _check_stop(stop)
        log.info("read %s: %d passages", path, position)


def _batches(items: Iterator[Any], size: int) -> Iterator[tuple[list[Any], bool]]:
    """Lists of up to `size` items, each with whether it is the last (an empty last one included)."""
    batch = list(islice(items, size))
    while True:
        following = list(islice(items, size)) if len(batch) == size else []
        yield batch, not following
        if not following:
            return
        batch = following


def _embed_pending(store: PassageStore, embedder: Embedder, stop: threading.Event, progress: bool) -> None:
    if store.meta("dim") not in (None, embedder.dim):
        raise BuildError(f"stored vectors have {store.meta('dim')} dimensions, {embedder.name} gives {embedder.dim}")
    store.set_meta("dim", embedder.dim)
    store.trim_vectors(embedder.dim)
    total, started, last_log = store.count(), time.monotonic(), time.monotonic()
    files.report_progress(store.folder, "embedding passages", store.embedded, total)  # the stage before is over
    with tqdm(total=total, initial=store.embedded, unit="passage", desc="embedding", disable=not progress) as bar:
        while rows := store.pending(store.embedded, EMBED_BATCH):
            ids, texts = zip(*rows)
            store.append_vectors(ids[0], embedder.encode(texts))
            bar.update(len(rows))
            files.report_progress(store.folder, "embedding passages", store.embedded, total)
            if time.monotonic() - last_log > LOG_EVERY_S:
                rate = bar.n / max(1e-9, time.monotonic() - started)
                log.info("embedded %d/%d passages (%.0f/s)", store.embedded, total, rate)
                last_log = time.monotonic()
            _check_stop(stop)


def _publish(store: PassageStore, job: BuildJob, sources: list[Path], dim: int) -> dict[str, Any]:
    vectors = store.vectors(dim)

    def rows(ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(vectors[ids - 1])

    previous = files.read_manifest(job.folder) or {}
    generation = int(previous.get("generation", 0)) + 1
    parts = {}
    for part, held_out in (("train", False), ("held_out", True)):
        ids = store.ids(held_out)
        log.info("indexing %d %s passages (%s)", len(ids), part, index.kind_for(len(ids)))
        built = index.build(rows, ids, dim, seed=job.seed)
        name = f"{part}-{generation}{files.INDEX_SUFFIX}"
        index.save(built.index, job.folder / name)
        parts[part] = {"file": name, "kind": built.kind, "nprobe": built.nprobe, "count": len(ids),
                       "bytes": (job.folder / name).stat().st_size}
    result = _manifest(store, job, sources, dim, parts, generation)
    atomic_write_json(job.folder / files.MANIFEST_FILE, result)
    _remove_old_indexes(job.folder, {part["file"] for part in parts.values()})
    log.info("replay buffer ready: %d passages (%d held out), source %s", result["passages"], result["held_out"],
             result["source"])
    return result


def _manifest(store: PassageStore, job: BuildJob, sources: list[Path], dim: int, parts: dict[str, Any],
              generation: int) -> dict[str, Any]:
    tokens = store.db.execute("SELECT COALESCE(SUM(tokens), 0) FROM passages").fetchone()[0]
    return {
        "format": files.MANIFEST_FORMAT, "generation": generation, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": "corpus" if job.corpus else "synthetic", "model_id": job.model_id,
        "embedder": job.embedder, "dim": dim, "settings": job.cut_settings,
        "fingerprint": corpus.fingerprint(sources, job.cut_settings),
        "passages": store.count(), "held_out": store.count(held_out=True), "tokens": int(tokens),
        "indexes": parts,
    }


def _remove_old_indexes(folder: Path, keep: set[str]) -> None:
    for path in folder.glob(f"*{files.INDEX_SUFFIX}"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _check_stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise Stopped("replay build stopped; the next build resumes where it left off")


# ---- text the base model writes --------------------------------------------------------------


def _synthetic_ready(job: BuildJob) -> bool:
    folder = job.folder / files.SYNTHETIC_DIR
    meta = read_json(folder / files.SYNTHETIC_META_FILE, lenient=True) or {}
    return meta.get("model_id") == job.model_id and (folder / files.SYNTHETIC_CORPUS_FILE).is_file()


def make_synthetic_corpus(job: BuildJob, stop: threading.Event) -> None:
    """Have the base model write the corpus (no corpus is configured) and store it as one. How far
    it got is kept after every batch, so a build stopped part way (the daemon restarted) goes on
    from there instead of asking the base everything again."""
    if job.generator is None:
        raise BuildError("replay.corpus is empty, so the corpus is synthesized from the base model, "
                         "and no model server is given: start the daemon (`cld run`) or set replay.corpus")
    chat = job.generator.own_chat and synth.supports_chat(job.generator)
    folder = job.folder / files.SYNTHETIC_DIR
    so_far = _synthesis_so_far(folder / files.SYNTHETIC_PARTIAL_FILE, job, chat)
    log.info("no replay.corpus configured: synthesizing %d documents from %s (%s)%s", job.synthetic_documents,
             job.generator.model, "chat" if chat else "completions",
             f", going on from {len(so_far.documents)} written earlier" if so_far.asked else "")

    files.report_progress(job.folder, "synthesizing the corpus", len(so_far.documents), job.synthetic_documents)

    def checkpoint(state: synth.CorpusSoFar) -> None:
        atomic_write_json(folder / files.SYNTHETIC_PARTIAL_FILE,
                          {"model_id": job.model_id, "chat": chat, "seed": job.seed,
                           "temperature": job.synthetic_temperature, **asdict(state)})

    documents = synth.synthesize_corpus(synth.endpoint(job.generator, chat), job.synthetic_documents, chat,
                                        job.synthetic_temperature, job.seed, stop,
                                        progress=_reporter(job, "synthesizing the corpus"), so_far=so_far,
                                        checkpoint=checkpoint)
    _check_stop(stop)
    (folder / files.SYNTHETIC_PARTIAL_FILE).unlink(missing_ok=True)  # finished: a next try starts afresh
    if not documents:
        raise BuildError(f"the base model at {job.generator.base_url} wrote no usable text for the synthetic corpus")
    atomic_write_jsonl(folder / files.SYNTHETIC_CORPUS_FILE, documents)
    meta = {"model_id": job.model_id, "documents": len(documents), "chat": chat}
    atomic_write_json(folder / files.SYNTHETIC_META_FILE, meta)


def _synthesis_so_far(path: Path, job: BuildJob, chat: bool) -> synth.CorpusSoFar:
    """Where an earlier synthesis for this model stopped (nothing when it was another model's, asked
    another way, with another seed or temperature, or the file is unreadable)."""
    found = read_json(path, lenient=True)
    made_for = {"model_id": job.model_id, "chat": chat, "seed": job.seed, "temperature": job.synthetic_temperature}
    if not isinstance(found, dict) or any(found.get(key) != value for key, value in made_for.items()):
        return synth.CorpusSoFar()
    try:
        return synth.CorpusSoFar(documents=[{"text": str(d["text"]), "topic": str(d["topic"])} for d in found["documents"]],
                                 asked=int(found["asked"]), rejected={str(k): int(v) for k, v in found["rejected"].items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        log.warning("%s is unreadable: the synthetic corpus is written from the start", path)
        return synth.CorpusSoFar()


def _reporter(job: BuildJob, stage: str) -> synth.Progress:
    return lambda done, total: files.report_progress(job.folder, stage, done, total)


def _rehearsal_stale(job: BuildJob) -> str | None:
    found = read_json(job.folder / files.REHEARSAL_FILE, lenient=True)
    if not isinstance(found, dict) or found.get("model_id") != job.model_id:
        return "no behaviour rehearsal pairs for this base model yet"
    return None


def make_rehearsal(job: BuildJob, generator: synth.GeneratorSpec, stop: threading.Event) -> None:
    """Record the base model's own answers to varied chat prompts (chat models only)."""
    chat = synth.supports_chat(generator)
    pairs: list[dict[str, Any]] = []
    if chat:
        log.info("asking the base model %d chat prompts for behaviour rehearsal", job.rehearsal_prompts)
        files.report_progress(job.folder, "asking rehearsal prompts", 0, job.rehearsal_prompts)
        pairs = synth.rehearsal_pairs(synth.endpoint(generator, chat=True), job.rehearsal_prompts,
                                      job.rehearsal_held_out, job.seed, stop=stop,
                                      progress=_reporter(job, "asking rehearsal prompts"))
        _check_stop(stop)
    else:
        log.info("the base model has no chat template: no behaviour rehearsal")
    atomic_write_json(job.folder / files.REHEARSAL_FILE, {"model_id": job.model_id, "chat": chat, "pairs": pairs})


# ---- entry point ----------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per question asked of the model is noise
    job = BuildJob.from_json(Path(argv[0]).read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run(job, stop)
    except Stopped as error:
        log.info("%s", error)
        return files.STOPPED_EXIT_CODE
    except (BuildError, corpus.CorpusError, synth.GeneratorUnavailable, files.BuildLocked, ValueError) as error:
        log.error("replay build failed: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The replay buffer as the daemon uses it: build it in the background, summarize it.

Owns turning `[replay]` settings into a build job for `replay.build` and a selection plan for
`replay.select`; running the build in a low-priority subprocess once vLLM is ready (serving never
waits for it; a failure is logged, never fatal; shutdown stops it and the next start resumes it);
and the `replay` part of the status. Knows nothing of how the buffer is built or searched: that
is the `replay` package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.layout import REPLAY_DIR, StateDir
from daemon.model import ModelError, answer_stop, model_name, prepared
from replay import seed
from replay.durable import atomic_write_text
from replay.files import STOPPED_EXIT_CODE, read_manifest, read_progress
from replay.job import BuildJob
from replay.select import ReplayPlan
from replay.synth import GeneratorSpec

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
BUILD_NICENESS = 10
STOP_TIMEOUT_S = 5.0


def replay_dir(settings: Settings) -> Path:
    return settings.state.dir / REPLAY_DIR


def summary(settings: Settings) -> dict[str, Any]:
    """The status's `replay` object, from the published manifest (zeros before the first build)."""
    found = read_manifest(replay_dir(settings)) or {}
    return {"source": found.get("source"), "passages": found.get("passages", 0), "held_out": found.get("held_out", 0),
            "building": building(settings)}


def building(settings: Settings) -> dict[str, Any] | None:
    """The running build's progress (`summary`'s `building`), without reading the manifest."""
    return read_progress(replay_dir(settings))


def progress_line(building: dict[str, Any] | None) -> str | None:
    """"synthesizing the corpus 120/400, about 12 min left" while a build runs, else None."""
    if not building:
        return None
    eta = building.get("eta_s")
    left = f", about {max(1, round(eta / 60))} min left" if eta is not None else ""
    return f"{building['stage']} {building['done']}/{building['total']}{left}"


def generator(settings: Settings, base_url: str, model: str, api_key: str = "") -> GeneratorSpec:
    """The base model, served as `model` at `base_url` (vLLM or the front), as writer of replay text;
    a pretrained model (no chat template) is asked in completion form (daemon.model.answer_stop)."""
    try:
        folder = prepared(settings.model.base, StateDir(settings.state.dir))
    except ModelError:  # not there: the build then fails on what it asks, and says so
        folder = None
    stop = answer_stop(folder) if folder is not None else ()
    return GeneratorSpec(base_url.rstrip("/"), model, api_key, timeout_s=settings.serve.request_timeout_s,
                         stop=stop, own_chat=not stop)


def build_job(settings: Settings, spec: GeneratorSpec | None) -> BuildJob:
    replay = settings.replay
    return BuildJob(
        folder=replay_dir(settings), corpus=list(replay.corpus), embedder=replay.embedder,
        passage_tokens=replay.passage_tokens, held_out_fraction=replay.held_out_fraction,
        text_field=replay.text_field, model_id=model_name(settings.model.base), generator=spec,
        synthetic_documents=replay.synthetic_documents, synthetic_temperature=replay.synthetic_temperature,
        rehearsal_prompts=replay.rehearsal_prompts, rehearsal_held_out=replay.rehearsal_held_out,
    )


def plan(settings: Settings) -> ReplayPlan:
    replay = settings.replay
    return ReplayPlan(strategy=replay.strategy, mix=dict(replay.mix), ratio=replay.ratio,
                      knowledge_share=replay.knowledge_share, rehearsal_pairs=replay.rehearsal_pairs,
                      knowledge_floor=replay.knowledge_floor, knowledge_cap=replay.knowledge_cap,
                      knowledge_forms=replay.knowledge_forms, corpus_floor=replay.corpus_floor)


class BackgroundBuild:
    """Brings the replay buffer up to date in a niced `python -m replay.build` process.

    The process checks the buffer fully (loading the indexes) and exits at once when it is up to
    date, so a damaged or mismatched buffer is found at every start, without FAISS in the daemon.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self.tasks[-1] if self.tasks else None

    def needs_no_server(self) -> bool:
        """Whether the buffer can be built before the model serves: from replay.corpus (the rehearsal
        pairs follow once it serves), or from the replay text the embedded model shipped with."""
        return bool(self.settings.replay.corpus) or seed.matches(build_job(self.settings, None))

    def start(self, spec: GeneratorSpec | None) -> None:
        """Bring the buffer up to date, asking the base model served as `spec` for text (None: no
        server yet); after a build started before, if one is still under way."""
        self.tasks.append(asyncio.create_task(self._run(build_job(self.settings, spec), self.task),
                                              name="replay-build"))

    async def stop(self) -> None:
        """Stop the builds (they resume at the next start) and wait for them."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, job: BuildJob, after: asyncio.Task[None] | None = None) -> None:
        if after is not None:
            await asyncio.wait([after])
        try:
            code = await _build_in_subprocess(job)
        except Exception:  # the daemon serves on without replay; the next start tries again
            log.exception("replay build could not run")
            return
        if code not in (0, STOPPED_EXIT_CODE):
            log.error("replay build failed (exit code %s; see its log above); the next start tries again", code)


async def _build_in_subprocess(job: BuildJob) -> int:
    """Run the build under `daemon.engine.reaper` (it dies with us, even by kill -9); a cancel stops it.

    The build survives being killed at any point (it resumes), so stopping waits only briefly.
    """
    job_path = job.folder / JOB_FILE
    atomic_write_text(job_path, job.to_json())
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.engine.reaper", "--", sys.executable, "-m", "replay.build", str(job_path),
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=lambda: os.nice(BUILD_NICENESS),
    )
    try:
        return await process.wait()
    except asyncio.CancelledError:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        raise


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)

"""The learning cycle: select replay → train → load candidate → probe → decide → promote or reject.

Owns the order of the stages, one cycle at a time, and every swap of what the stable name serves
(promotion and rollback): the new adapter is loaded under a fresh name, the router switches in one
assignment, requests in flight finish on the old adapter, and the old one is unloaded once they
have drained. Each stage is a call into the module that owns it; side effects stay here, at the
edge. Knows nothing of HTTP, scheduling, or how any stage works inside.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

from daemon import logs
from daemon.config import Settings
from daemon.engine.merged import Fleet, is_merged
from daemon.engine.router import Adapter, Router
from daemon.ingestion.chunking import record_text
from daemon.layout import CYCLES_DIR, JOBS_DIR, REPLAY_DIR, StateDir, is_version
from daemon.learning import adapters, forms, probes, replay_plan
from daemon.learning.decide import Decision, decide, thresholds
from daemon.learning.jobs import JobData, TrainJob
from daemon.learning.records import FAILED, PROMOTED, REJECTED, SKIPPED, CycleRecord, CycleStore
from replay.durable import atomic_write_text, lock_held
from replay.files import LOCK_FILE as REPLAY_LOCK_FILE
from replay.select import select_replay

log = logging.getLogger(__name__)
T = TypeVar("T")
DRAIN_TIMEOUT_S = 120.0
TRAINER_STOP_TIMEOUT_S = 30.0
PROMOTE_FINISH_TIMEOUT_S = 15.0  # at shutdown the front is closed already, so nothing is left to drain
CANCEL_TIMEOUT_S = 5.0  # a cancelled cycle only writes its record
TRAIN_NICENESS = 10  # the trainer yields the CPU to serving (vLLM) and the daemon; idle, it gets it all
# How the trainer's OpenMP threads wait for work (GNU OpenMP: OMP_WAIT_POLICY, GOMP_SPINCOUNT;
# Intel's: KMP_BLOCKTIME). Beside a busy vLLM, threads that spin starve each other and the server,
# so they sleep (TRAINER_ENV); with serving quiet, a short spin trains ~1.5x faster and costs
# serving no more than sleeping if requests come (bench/train_under_load.py, docs/BENCHMARKS.md).
TRAINER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}
SHORT_SPIN_ENV = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0"}
QUIET_S = 60.0  # serving counts as quiet after this long without a request (train.thread_wait = "auto")
SHIPPED_DRIFT_PROMPTS = Path(__file__).parent / "data" / "drift_prompts.txt"


class Skip(Exception):
    """Nothing to learn now (no new documents, replay buffer not built); not a failure."""


class CannotServe(RuntimeError):
    """A version asked for could not be loaded; what served before still serves."""


class Learner:
    """Runs cycles one at a time and owns every change of the served adapter."""

    def __init__(self, settings: Settings, state: StateDir, client: Fleet, router: Router, journal: Any,
                 model_dir: Path, on_swap: Callable[[float], None] = lambda seconds: None):
        self.settings, self.state, self.client, self.router = settings, state, client, router
        self.journal, self.model_dir = journal, model_dir
        self.on_swap = on_swap  # told how long each swap took (the daemon's metrics time them)
        self.cycles = CycleStore(state.root / CYCLES_DIR)
        self.cycle_lock, self.swap_lock = asyncio.Lock(), asyncio.Lock()
        self.current: Optional[CycleRecord] = None
        self.trainer: Optional[asyncio.subprocess.Process] = None
        self.task: Optional[asyncio.Task[CycleRecord]] = None
        self.memo = probes.ProbeMemo(client)  # probe answers: each model is asked each probe once
        self.forms = forms.Library(settings.augment, settings.probes, state.forms, state.teacher, self._whole_text)
        self.rolling_back: set[str] = set()  # versions a rollback is loading
        self.cancelled_because = "the daemon is stopping"  # what a cancelled cycle's record says

    # ---- the cycle ------------------------------------------------------------------------------

    async def run_cycle(self, trigger: str) -> CycleRecord:
        """One learning cycle, start to end. Serving is never touched unless the candidate passes."""
        async with self.cycle_lock:
            record = self.current = self.cycles.begin(trigger)
            logged = logs.current_cycle.set(record)  # log lines carry the cycle's id, version and stage
            served: Optional[str] = None
            try:
                documents = self._stage(record, "select", self.new_documents())
                made = await self._astage(record, "augment", self.forms.prepare(documents, self.client,
                                                                                self.router.base_served_name))
                job = self._stage(record, "select", self.build_job(record, documents, made))
                relearned = self.relearned(record)
                folder = await self._astage(record, "train", self.train(record, job))
                served = await self._astage(record, "load", self.load(folder, record.version))
                measured = await self._astage(record, "probe", self.probe(record, documents + relearned, served))
                decision = decide(measured.results, thresholds(self.settings.probes))
                record.judge(decision)
                record.probes = measured.to_dict()
                await self._astage(record, "promote" if decision.promote else "reject",
                                   self.conclude(record, decision, folder, served, documents, relearned))
                return self.cycles.finish(record, PROMOTED if decision.promote else REJECTED)
            except Skip as why:
                return self.cycles.finish(record, SKIPPED, [str(why)])
            except asyncio.CancelledError:
                self.cycles.finish(record, FAILED, error=f"cancelled: {self.cancelled_because}")
                await self._unload_candidate(served)
                raise
            except Exception as error:  # noqa: BLE001 - any failure leaves serving as it was
                log.exception("cycle %d failed at stage %s", record.id, record.stage)
                await self._unload_candidate(served)
                return self.cycles.finish(record, FAILED, error=f"{record.stage}: {error}")
            finally:
                self.current = None
                self.prune()
                logs.current_cycle.reset(logged)

    def request(self, trigger: str) -> CycleRecord | None:
        """Start a cycle in the background unless one runs; returns the running one, if any."""
        if self.task is not None and not self.task.done():
            return self.current
        self.task = asyncio.create_task(self.run_cycle(trigger), name=f"cycle-{trigger}")
        return None

    def _stage(self, record: CycleRecord, stage: str, result: T) -> T:
        record.enter(stage)
        self.cycles.save(record)
        return result

    async def _astage(self, record: CycleRecord, stage: str, work: Awaitable[T]) -> T:
        record.enter(stage)
        self.cycles.save(record)
        log.info("cycle %d: %s", record.id, stage)
        return await work

    # ---- stages ---------------------------------------------------------------------------------

    def new_documents(self) -> list[dict[str, Any]]:
        """The ready documents this cycle learns: those refused fewer times first, then the oldest,
        up to `schedule.max_cycle_tokens` (at least one); the rest wait for the next cycle."""
        documents = self.journal.documents("ready")
        if not documents:
            raise Skip("no new documents")
        return within_budget(sorted(documents, key=lambda doc: (doc["attempts"], doc["id"])),
                             self.settings.schedule.max_cycle_tokens)

    def build_job(self, record: CycleRecord, documents: list[dict[str, Any]], made: dict[str, forms.Forms]) -> TrainJob:
        """Choose the version, the parent and the training data (new chunks + replay)."""
        # Deliberately lazy: FAISS loads into the daemon only once a cycle needs the buffer.
        from replay.buffer import BufferMissing, ReplayBuffer, load_rehearsal

        if lock_held(self.state.root / REPLAY_DIR / REPLAY_LOCK_FILE):  # its store is rewritten: read it after
            building = replay_plan.progress_line(replay_plan.building(self.settings))
            raise Skip("the replay buffer is being built" + (f" ({building})" if building else "") +
                       "; a cycle can run once it is ready (see `cld status`)")
        record.documents = [doc["id"] for doc in documents]
        learned = self.journal.documents("learned")
        parent = self.router.current if self.settings.train.warm_start else None
        if parent is not None and (served_method := adapters.version_method(parent.path)) != self.settings.train.method:
            # A version of another method cannot be continued: start from the base, and learn again
            # what the served lineage had learned, as hard as the new documents.
            ids = {doc["id"] for doc in learned}
            record.relearned = [i for i in lineage_documents(self._lineage()) if i in ids and i not in record.documents]
            log.warning("cycle %d: the served %s was trained with train.method %r, this run uses %r: it starts "
                        "from the base and learns again the %d documents learned so far", record.id, parent.version,
                        served_method, self.settings.train.method, len(record.relearned))
            parent = None
        relearned = [doc for doc in learned if doc["id"] in record.relearned]
        new = self.journal.chunks(record.documents + record.relearned)
        earlier = [doc for doc in learned if doc["id"] not in record.relearned + record.documents]
        try:
            buffer = ReplayBuffer.open(self.state.root / REPLAY_DIR)
        except BufferMissing:
            raise Skip("the replay buffer is not built yet (cld builds it after start; see `cld status`)") from None
        rehearsal, _ = load_rehearsal(self.state.root / REPLAY_DIR)
        made |= {doc["hash"]: self.forms.of(doc) for doc in relearned}
        forms_trained = [r for doc in [*documents, *relearned] for r in made[doc["hash"]].records]
        try:
            chosen = select_replay(buffer, [record_text(chunk) for chunk in new],
                                   [record_text(chunk) for chunk in self.journal.chunks([doc["id"] for doc in earlier])],
                                   rehearsal, replay_plan.plan(self.settings), seed=record.id,
                                   form_tokens=sum(buffer.count_tokens(record_text(r)) for r in forms_trained))
            # earlier documents come back in the forms they were trained in too, in proportion to their chunks
            budget = int(self.settings.replay.knowledge_forms * sum(map(buffer.count_tokens, chosen.knowledge)))
            replayed = self.forms.replayed(earlier, budget, buffer.count_tokens, seed=record.id)
        finally:
            buffer.close()
        record.version = adapters.next_version(self.state.adapters, [r.version for r in self.cycles.all() if r.version])
        record.parent = parent.version if parent else None
        self.cycles.save(record)
        return TrainJob(
            version=record.version, base_model=str(self.model_dir), output_dir=str(self.state.adapters),
            parent_version=record.parent, parent_path=str(parent.path) if parent else None,
            documents=[doc["hash"] for doc in documents], relearned=[doc["hash"] for doc in relearned],
            data=JobData.mixed(new, chosen.records() + [{"kind": "knowledge", **r} for r in replayed],
                               forms_trained),
            hyper=self.settings.train,
            augmentation={doc["hash"]: made[doc["hash"]].report for doc in documents if made[doc["hash"]].records},
        )

    async def train(self, record: CycleRecord, job: TrainJob) -> Path:
        """Run the recipe in its own process; its progress goes into the cycle record."""
        jobs = self.state.root / JOBS_DIR
        job_file = jobs / f"{job.version}.json"
        atomic_write_text(job_file, job.model_dump_json(indent=1))
        self.state.logs.mkdir(parents=True, exist_ok=True)
        with open(self.state.logs / f"train-{job.version}.log", "ab") as train_log:
            self.trainer = await start_trainer(job_file, train_log, self.thread_policy(), self.settings.train.devices,
                                               self.settings.train.torchrun_args)
            try:
                await self._follow(record, self.trainer)
                code = await self.trainer.wait()
            finally:
                self.trainer = None
        adapters.remove_partial(self.state.adapters)
        if code != 0:
            raise RuntimeError(f"the trainer exited with code {code} (log: logs/train-{job.version}.log)")
        folder = self.state.adapters / job.version
        adapters.check_version(folder, self.settings.train.vllm_max_lora_rank)
        return folder

    def thread_policy(self) -> dict[str, str]:
        """How the trainer's threads wait: a short spin when serving has been quiet (and
        `train.thread_wait` allows it), else sleep."""
        wait, idle = self.settings.train.thread_wait, self.router.idle_s()
        spin = wait == "short-spin" or (wait == "auto" and idle >= QUIET_S)
        log.info("trainer threads %s (serving idle for %.0f s)", "spin briefly" if spin else "sleep", idle)
        return SHORT_SPIN_ENV if spin else TRAINER_ENV

    async def _follow(self, record: CycleRecord, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        saved = 0.0
        while line := await process.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "progress":
                record.progress = {k: event[k] for k in ("step", "steps", "loss", "tokens_per_s", "eta_s")}
                if time.monotonic() - saved > 5:
                    self.cycles.save(record)
                    saved = time.monotonic()
            elif event.get("event") == "done":
                record.progress = {**record.progress, **event["summary"]}

    async def load(self, folder: Path, version: str | None) -> str:
        """Load an adapter into vLLM under a name never used before (no stale prefix cache); a
        merged-weight version gets a vLLM instance of its own (`daemon.engine.merged`)."""
        served = f"{self.settings.serve.model_name}-{version}-{secrets.token_hex(3)}"
        if is_merged(folder):
            await self.client.load_merged(served, folder)
        else:
            await self.client.load_lora(served, folder)
        return served

    async def probe(self, record: CycleRecord, documents: list[dict[str, Any]], served: str) -> probes.Measured:
        probe_set = self.probe_set(record, documents)
        incumbent = self.router.current.served_name if self.router.current else None
        hits, misses = self.memo.hits, self.memo.misses
        measured = await probes.run_probes(self.client, probe_set, self.router.base_served_name, served, incumbent,
                                           drift_tokens=self.settings.probes.drift_tokens, memo=self.memo)
        log.info("cycle %d: probes asked vLLM %d questions, %d answered from memory", record.id,
                 self.memo.misses - misses, self.memo.hits - hits)
        return measured

    def probe_set(self, record: CycleRecord, documents: list[dict[str, Any]]) -> probes.ProbeSet:
        """The texts to probe with, derived from whatever arrived and from the replay buffer."""
        from replay.buffer import ReplayBuffer, load_rehearsal  # deliberately lazy, as in build_job

        settings, lineage = self.settings.probes, self._lineage()
        new_texts = [record_text(chunk) for chunk in self.journal.chunks(record.documents)]
        cloze = [c for doc in documents for c in probes.build_cloze(
            self._document_text(doc["id"]), settings.cloze_per_document, cuts=settings.cloze_cuts)]
        record.cloze = [[c.prompt, c.expected] for c in cloze]
        buffer = ReplayBuffer.open(self.state.root / REPLAY_DIR)
        try:
            # the random half is the same every cycle, so the incumbent's answers to it are remembered
            held_out = [p.text for p in buffer.held_out_passages(settings.held_out_passages, near=new_texts[:8])]
        finally:
            buffer.close()
        _, behaviour = load_rehearsal(self.state.root / REPLAY_DIR)
        return probes.ProbeSet(
            held_out_passages=held_out,
            behaviour=[([{"role": "user", "content": pair.prompt}], pair.answer) for pair in behaviour],
            drift_prompts=_lines(settings.drift_prompts or SHIPPED_DRIFT_PROMPTS),
            new_chunks=new_texts[: settings.new_chunks],
            cloze=cloze,
            retention=probes.spread(retention_probes(lineage), settings.retention_probes, record.id),
            retention_chunks=probes.spread([record_text(chunk) for chunk in self.journal.chunks(lineage_documents(lineage))],
                                           settings.retention_chunks, record.id),
            qa=[probes.QA(item["question"], item["answer"]) for path in settings.qa_sets for item in _jsonl(path)],
            answers=[qa for doc in documents for qa in self.forms.teacher_held_out(doc)],
            questions=[q for doc in documents for q in self.forms.of(doc, keep=True).questions],
        )

    def relearned(self, record: CycleRecord) -> list[dict[str, Any]]:
        """The documents the cycle learns again (record.relearned), probed as its new ones are."""
        return [doc for doc in self.journal.documents("learned") if doc["id"] in record.relearned]

    async def conclude(self, record: CycleRecord, decision: Decision, folder: Path, served: str,
                       documents: list[dict[str, Any]], relearned: list[dict[str, Any]]) -> None:
        if not decision.promote:
            log.info("cycle %d: %s rejected: %s", record.id, record.version, "; ".join(decision.reasons))
            await self._unload_quietly(served)
            self.set_aside(record, [doc["id"] for doc in documents], decision)
            return
        await self.swap(Adapter(record.version or "", served, folder))
        self.journal.mark_learned([doc["id"] for doc in [*documents, *relearned]], record.version)
        log.info("cycle %d: %s promoted: %s", record.id, record.version, "; ".join(decision.reasons))

    def set_aside(self, record: CycleRecord, document_ids: list[int], decision: Decision) -> None:
        """Count the refusal against the cycle's documents; set aside those refused
        `schedule.max_attempts` times, so they stop joining (and lengthening) every later cycle."""
        limit = self.settings.schedule.max_attempts
        why = f"cycle {record.id} refused its candidate {record.version}: " + "; ".join(c.reason for c in decision.failures)
        for doc in self.journal.refused(document_ids, why, limit):
            note = (f"{doc['source']} set aside after {limit} refused cycles (`cld retry {doc['id']}` puts it back)")
            log.warning("cycle %d: %s", record.id, note)
            record.reasons.append(note)

    def prune(self) -> None:
        """Delete the weights of merged-weight versions beyond `state.keep_merged` (never the
        served one); a failure is logged, never fails the cycle."""
        kept = {self.router.current.version} if self.router.current else set()
        try:
            promoted = [r.version for r in self.cycles.all() if r.state == PROMOTED and r.version]
            pruned = adapters.prune_merged(self.state.adapters, promoted, kept | self.rolling_back,
                                           self.settings.state.keep_merged)
        except (OSError, ValueError) as error:  # a damaged cycle record or meta.json: nothing is deleted
            log.warning("could not delete old merged-weight versions: %s", error)
            return
        if pruned:
            log.info("deleted the weights of %s (state.keep_merged = %d; their meta.json stays)",
                     ", ".join(pruned), self.settings.state.keep_merged)

    # ---- serving changes ------------------------------------------------------------------------

    async def _unload_candidate(self, served: str | None) -> None:
        """Unload a cycle's candidate unless it was promoted meanwhile (its merged instance stops)."""
        if served and not (self.router.current and self.router.current.served_name == served):
            await self._unload_quietly(served)

    async def swap(self, adapter: Adapter | None) -> None:
        """Serve `adapter` (loaded already; None = the base) under the stable name; drain and
        unload the previous one."""
        async with self.swap_lock:
            started_s = time.perf_counter()
            previous = self.router.current
            self.router.switch(adapter)
            if previous is not None and (adapter is None or previous.served_name != adapter.served_name):
                await self.router.drained(previous.served_name, DRAIN_TIMEOUT_S)
                await self._unload_quietly(previous.served_name)
            self.on_swap(time.perf_counter() - started_s)

    async def rollback(self, version: str | None) -> Adapter | None:
        """Serve `version` again (None = the base model)."""
        if version is None:
            await self._stop_cycle_for(None)
            await self.swap(None)
            return None
        if not is_version(version):
            raise ValueError(f"{version!r} is not an adapter version (such as v0003) or 'base'")
        folder = self.state.adapters / version
        if not folder.is_dir():
            raise ValueError(f"no adapter version {version!r}; known: {', '.join(adapters.versions(self.state.adapters))}")
        adapters.check_version(folder, self.settings.train.vllm_max_lora_rank)
        self.rolling_back.add(version)  # not pruned by a cycle ending meanwhile
        try:
            await self._stop_cycle_for(version)
            try:
                served = await self.load(folder, version)
            except RuntimeError as error:  # vLLM refused the adapter, or the version's instance did not start
                raise CannotServe(f"{version} could not be served, {self._serving_words()} still serves: "
                                  f"{error}") from error
            adapter = Adapter(version, served, folder)
            await self.swap(adapter)
        finally:
            self.rolling_back.discard(version)
        return adapter

    async def _stop_cycle_for(self, version: str | None) -> None:
        """A rollback stops a running cycle: its candidate was built on, and would be judged against,
        the version rolled back from (promoted, it would undo the rollback), and a merged-weight
        candidate holds the instance slot the rolled-back version needs. Its documents wait for the
        next cycle, their attempts not counted."""
        if self.task is None or self.task.done():
            return
        running = self.current.id if self.current else None
        log.warning("rolling back to %s: stopping cycle %s, whose candidate was built on %s", version or "the base",
                    running, self._serving_words())
        await self.stop(f"rolled back to {version or 'the base'} while it ran")

    def _serving_words(self) -> str:
        return self.router.current.version if self.router.current else "the base"

    async def stop(self, why: str = "the daemon is stopping") -> None:
        """Cancel a running cycle, journaled as failed "cancelled: `why`"; the trainer gets SIGTERM
        (then SIGKILL), a loaded candidate is unloaded and no staging folder stays. A promotion
        under way finishes first (up to PROMOTE_FINISH_TIMEOUT_S), so serving.json and the journal agree."""
        task, trainer = self.task, self.trainer
        if task is None or task.done():
            return
        self.cancelled_because = why
        if self.current is not None and self.current.stage == "promote":
            await asyncio.wait([task], timeout=PROMOTE_FINISH_TIMEOUT_S)
        task.cancel()
        if trainer is not None and trainer.returncode is None:
            trainer.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(trainer.wait(), TRAINER_STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                trainer.kill()
                await trainer.wait()
        await asyncio.wait([task], timeout=CANCEL_TIMEOUT_S)
        adapters.remove_partial(self.state.adapters)

    # ---- helpers --------------------------------------------------------------------------------

    def _document_text(self, document_id: int) -> str:
        return "\n".join(record_text(record) for record in self.journal.records(document_id))

    def _whole_text(self, document: dict[str, Any]) -> str | None:
        """A text document's whole text, from its journal records (None for instruction or chat data)."""
        records = self.journal.records(document["id"])
        if not all("text" in record for record in records):
            return None
        return "\n\n".join(record["text"] for record in records)

    def _lineage(self) -> list[CycleRecord]:
        """The promoted cycles that made the serving version: it and its ancestors."""
        lineage, version = set(), self.router.current.version if self.router.current else None
        while version and version not in lineage:
            lineage.add(version)
            version = adapters.read_meta(self.state.adapters / version).get("parent")
        return [record for record in self.cycles.all() if record.state == PROMOTED and record.version in lineage]

    async def _unload_quietly(self, served: str) -> None:
        try:
            await self.client.unload_lora(served)
        except Exception as error:  # noqa: BLE001 - unloading is housekeeping; vLLM restarts clear it anyway
            log.warning("could not unload %s: %s", served, error)



async def start_trainer(job_file: Path, log: Any, policy: dict[str, str] = TRAINER_ENV, devices: int = 1,
                        torchrun_args: list[str] | None = None) -> asyncio.subprocess.Process:
    """`python -m daemon.learning.train JOB --json-progress` (under torchrun with `devices` > 1:
    train.devices processes), below serving's CPU priority (TRAIN_NICENESS), with its OpenMP threads
    waiting as `policy` says (TRAINER_ENV: sleep)."""
    return await asyncio.create_subprocess_exec(
        *trainer_command(job_file, devices, torchrun_args or []),
        stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL,
        env=trainer_env(policy=policy), preexec_fn=lambda: os.nice(TRAIN_NICENESS))


def trainer_command(job_file: Path, devices: int, torchrun_args: list[str]) -> list[str]:
    """The trainer's argv: one process, or torchrun starting `devices` of them (`--standalone`
    unless `torchrun_args` say where the others are)."""
    trainer = ["-m", "daemon.learning.train", str(job_file), "--json-progress"]
    if devices == 1:
        return [sys.executable, *trainer]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices),
            *(torchrun_args or ["--standalone"]), *trainer]


def trainer_env(base: dict[str, str] | None = None, policy: dict[str, str] = TRAINER_ENV) -> dict[str, str]:
    """The trainer's environment: `policy` over `base` (default: ours), unless the OpenMP wait
    settings are set there already (an operator's choice wins)."""
    env = dict(os.environ if base is None else base)
    if any(key in env for key in TRAINER_ENV):
        return env
    return env | policy


def lineage_documents(lineage: list[CycleRecord]) -> list[int]:
    """The documents a lineage's cycles learned (new or again), each once, oldest first."""
    return list(dict.fromkeys(i for record in lineage for i in record.documents + record.relearned))


def retention_probes(lineage: list[CycleRecord]) -> list[probes.Cloze]:
    """The cloze probes of the documents a lineage's cycles learned."""
    return [probes.Cloze(prompt, expected) for record in lineage for prompt, expected in record.cloze]


def within_budget(documents: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    """The leading documents whose tokens add up to at most `max_tokens` (0: all), and at least the first."""
    chosen, total = [], 0
    for doc in documents:
        total += doc.get("tokens") or 0
        if chosen and max_tokens and total > max_tokens:
            break
        chosen.append(doc)
    return chosen


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

"""The daemon process (`cld run`): wires the stages together and owns start-up and shutdown.

Start-up: take the state directory's lock, open the front (so /health and /api/status answer at
once), prepare the base model, start (or reach) vLLM and wait for it, then tell systemd READY=1.
Shutdown on SIGTERM/SIGINT (`_shut_down`): stop taking documents, then requests, cancel a cycle,
stop vLLM and everything it spawned, close the journal, release the lock. Knows nothing of HTTP
routes (`daemon.front.app`), process supervision details (`daemon.engine.supervisor`) or the sd_notify
protocol (`daemon.systemd`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from daemon import model, systemd
from daemon.config import MIN_GPU_SHARE, Settings, base_gpu_share_left
from daemon.engine import vllm
from daemon.engine.merged import Fleet, Instance, MergedServers, is_merged
from daemon.engine.router import Adapter, Router
from daemon.engine.supervisor import State as SupervisorState
from daemon.engine.supervisor import Supervisor
from daemon.front import app, slowclients
from daemon.ingestion import inbox, watch
from daemon.ingestion.journal import Journal
from daemon.layout import JOURNAL_FILE, StateDir
from daemon.learning import replay_plan
from daemon.learning.cycle import CannotServe, Learner
from daemon.learning.records import CycleRecord
from daemon.learning.schedule import Schedule
from daemon.observe import metrics, status
from daemon.recall.recaller import Recaller, documents_of, open_index, template_tokens
from replay.durable import atomic_write_json, atomic_write_text, exclusive_lock

log = logging.getLogger(__name__)
FRONT_START_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5  # an idle kept-alive client connection is closed after this long (uvicorn's default)
CYCLE_START_WAIT_S = 0.5  # POST /api/cycles waits this long, so a cycle skipped at once says why
KEEPER_EVERY_S = 10.0  # how often the promoted adapter is checked to be loaded in vLLM
# A served merged-weight version whose instance exits this many times in a row, each soon after its
# start, cannot be served: the base serves instead (as for a LoRA version that cannot be loaded).
MERGED_FALLBACK_FAILURES = 3
RECALL_SYNC_S = 2.0  # how often the recall index is brought in step with the journal (new documents are recallable)
RECALL_STOP_TIMEOUT_S = 10.0  # a recall index pass under way gets this long to finish at shutdown
FRONT_STOP_TIMEOUT_S = 10.0  # requests in flight get this long to finish at shutdown
# While starting, systemd is asked for more time at each status tick, for at most this long beyond
# serve.startup_timeout_s (preparing the base model comes first; its conversion takes ~20 s on CPU).
PREPARE_ALLOWANCE_S = 600.0
# What systemd's status line says in each start-up phase (`systemctl status cld`).
PHASE_STATUS = {"starting": "starting", "preparing model": "preparing model",
                "starting model server": "starting vLLM", "stopping": "stopping"}


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to change."""


def run(settings: Settings) -> None:
    """Run the daemon until SIGTERM/SIGINT. Raises StartupError when it cannot start."""
    state = StateDir(settings.state.dir).ensure()
    with state_lock(state):
        _run_loop(Daemon(settings, state).run())


def state_lock(state: StateDir) -> contextlib.AbstractContextManager[None]:
    """One daemon per state directory: StartupError when another holds it."""
    return exclusive_lock(state.lock, lambda: StartupError(
        f"another cld daemon already uses this state directory ({state.root})"))


def _run_loop(main: Any) -> None:
    """Run on uvloop when installed (uvicorn's own choice): the proxy then costs vLLM less CPU."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        asyncio.run(main)
    else:
        uvloop.run(main)


class FrontServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Daemon:
    def __init__(self, settings: Settings, state: StateDir):
        self.settings = settings
        self.state = state
        serve = settings.serve
        # our own vLLM listens on a socket only this user reaches, and answers only cld (its key)
        self.vllm_socket = None if serve.vllm_url else vllm.sockets_dir(state.root) / vllm.BASE_SOCKET
        self.vllm_url = serve.vllm_url or vllm.socket_address(self.vllm_socket)
        self.vllm_key = serve.vllm_api_key if serve.vllm_url else vllm.new_key()
        self.upstream = vllm.async_client(self.vllm_url, httpx.Timeout(serve.request_timeout_s, connect=5),
                                          self.vllm_key, httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.vllm = vllm.VLLMClient(self.vllm_url, self.upstream)
        self.router = Router(serve.model_name, serve.base_name, state.serving)
        # merged-weight versions (train.method other than lora) get vLLM instances of their own
        self.merged = None if serve.vllm_url else MergedServers(settings, state.root, self.vllm_key,
                                                                self.router.endpoints)
        self.supervisor: Supervisor | None = None
        self.replay_build = replay_plan.BackgroundBuild(settings)
        self.journal = Journal(state.root / JOURNAL_FILE)
        self.watcher = watch.Watcher(settings, self.journal)  # ingests whether or not vLLM is up
        self.learner: Learner | None = None
        self.schedule: Schedule | None = None
        self.stopping = asyncio.Event()
        self.adapter_reloads = 0  # times the promoted adapter had vanished from vLLM
        self.fallbacks = 0  # times a version that could not be served left the base serving
        self.fallback: dict[str, Any] | None = None  # the last of them: version, reason, at
        self.phase = "starting"
        self.started_at = time.time()
        self.metrics = metrics.Metrics()  # /metrics; the state part is read from the state directory at scrape time
        self.metrics.watch(metrics.StateCollector(settings, lambda: self.supervisor.restarts if self.supervisor else 0))
        self.metrics.watch(metrics.HealthCollector(self._degraded, lambda: self.fallbacks))
        self.notifier = systemd.notifier()  # does nothing unless systemd started cld (Type=notify)
        self.recaller = Recaller(settings.recall, open_index(state.recall, settings.replay.embedder,
                                                             settings.recall.passage_tokens),
                                 settings.serve.max_model_len, observe=self.metrics.recall_done)
        self.metrics.watch(metrics.RecallCollector(self.recaller.index.view))
        self.recall_keeper: asyncio.Task[None] | None = None

    @property
    def fleet(self) -> Fleet:
        """One client for every served name: the base instance's, and the merged versions' own."""
        return Fleet(self.vllm, self.merged)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        server = FrontServer(uvicorn.Config(self._app(), log_config=None, access_log=False, lifespan="off",
                                            http=slowclients.protocol(self.settings.serve.client_timeout_s),
                                            timeout_keep_alive=KEEP_ALIVE_S))
        serving = asyncio.create_task(server.serve(sockets=[self._bind()]), name="front")
        told = self._tell_systemd()
        try:
            self.watcher.start()
            if self.replay_build.needs_no_server():  # e.g. the shipped replay text: ready while vLLM starts
                self.replay_build.start(None)
            if self.settings.recall.enabled:
                self.recall_keeper = asyncio.create_task(self._keep_recall(), name="recall-keeper")
            await self._start_model_server()
            if not self.stopping.is_set():
                self.phase = "serving"
                atomic_write_json(self.state.daemon, self._record())
                log.info("cld is serving %s and %s at %s", *self.router.public_names, self._url())
                self.replay_build.start(replay_plan.generator(self.settings, self.vllm_url, self.router.base_served_name,
                                                              self.vllm_key))
                self._start_learning()
                told.append(asyncio.create_task(self._keep_adapter(), name="adapter-keeper"))
                await _listening(server, serving)
                self.notifier.ready(self._status_line())
                await _first(self.stopping.wait(), serving)
        finally:
            await self._shut_down(server, serving)
            for task in told:
                task.cancel()
            self.notifier.close()

    async def _shut_down(self, server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
        """Stop in the order that loses nothing. Each step has a timeout; systemd/cld.service's
        TimeoutStopSec is above their sum (the arithmetic is there)."""
        self.phase = "stopping"
        await asyncio.to_thread(self.watcher.stop)  # no new documents; a file half taken stays in the inbox
        if self.recall_keeper is not None:  # its pass reads the journal, closed below
            await asyncio.wait([self.recall_keeper], timeout=RECALL_STOP_TIMEOUT_S)
        server.should_exit = True  # no new requests; those in flight get FRONT_STOP_TIMEOUT_S
        await asyncio.wait([serving], timeout=FRONT_STOP_TIMEOUT_S)
        if self.schedule is not None:
            self.schedule.stop()
        if self.learner is not None:
            await self.learner.stop()  # a running cycle is cancelled and journaled so; nothing half-written stays
        await self.replay_build.stop()  # resumable: it continues at the next start
        if self.supervisor is not None:
            await self.supervisor.stop()  # vLLM and all it spawned
        if self.merged is not None:
            await self.merged.stop_all()  # the instances of merged-weight versions
        await self.upstream.aclose()
        self.journal.close()
        self.state.daemon.unlink(missing_ok=True)
        self.state.vllm_key.unlink(missing_ok=True)
        log.info("cld stopped")

    def _request_stop(self, sig: int) -> None:
        log.info("received %s; shutting down", signal.Signals(sig).name)
        if not self.stopping.is_set():
            self.notifier.stopping()
        self.stopping.set()

    # ---- systemd (daemon.systemd): status line, start-up time, watchdog ----------------------------

    def _tell_systemd(self) -> list[asyncio.Task[None]]:
        """Background tasks on this event loop (a stuck loop stops them, and the watchdog notices)."""
        return [asyncio.create_task(systemd.report_status(self.notifier, self._status_line, self._starting),
                                    name="systemd-status"),
                asyncio.create_task(systemd.ping_watchdog(self.notifier), name="systemd-watchdog")]

    def _starting(self) -> bool:
        """Still starting, within the time start-up may take (then systemd is asked for more)."""
        limit_s = self.settings.serve.startup_timeout_s + PREPARE_ALLOWANCE_S
        return self.phase not in ("serving", "stopping") and time.time() - self.started_at < limit_s

    def _status_line(self) -> str:
        if self.stopping.is_set() or self.phase != "serving":
            return PHASE_STATUS.get("stopping" if self.stopping.is_set() else self.phase, self.phase)
        current = self.router.current
        line = status_line(current.version if current else None, self.learner.current if self.learner else None,
                           replay_plan.progress_line(replay_plan.building(self.settings)))
        return f"{why}; {line}" if (why := self._unhealthy_reason()) else line

    def _start_learning(self) -> None:
        model_dir = model.prepared(self.settings.model.base, self.state)
        if model_dir is None:
            log.error("the base model folder is not ready: learning is off (set model.base to a Hugging Face folder)")
            return
        self.vllm.stop = list(model.answer_stop(model_dir))
        self.learner = Learner(self.settings, self.state, self.fleet, self.router, self.journal, model_dir,
                               on_swap=self.metrics.swap_duration.observe)
        for record in self.learner.cycles.resolve_interrupted(self.router.current and self.router.current.version):
            log.warning("cycle %d was interrupted; marked %s", record.id, record.state)
        self.schedule = Schedule(self.settings.schedule, self._waiting_tokens, self.learner.request)
        self.schedule.start()

    def _waiting_tokens(self) -> int:
        return sum(doc["tokens"] or 0 for doc in self.journal.documents("ready"))

    def _app(self) -> Any:
        return app.create_app(
            self.router, self.upstream, healthy=self._healthy, status=self._status,
            unhealthy_reason=lambda: self._unhealthy_reason() or "degraded: vLLM does not answer its health check",
            api_key=self.settings.security.api_key, admin_key=self.settings.security.admin_key, ready=self._ready,
            admin=app.Admin(self._cycle, self._adapters, self._rollback, self._retry),
            uploads=inbox.Uploads(self.watcher.inbox, self.settings.ingest.max_file_bytes),
            max_body_bytes=self.settings.serve.max_request_bytes, metrics=self.metrics,
            client_timeout_s=self.settings.serve.client_timeout_s,
            min_body_rate=self.settings.serve.min_body_kb_s * 1000,
            limits=app.GenerationLimits(self.settings.serve.max_n, self.settings.serve.max_generated_tokens),
            recaller=self.recaller, chat_stop=lambda: self.vllm.stop,
        )

    async def _cycle(self) -> dict[str, Any]:
        if self.learner is None:
            raise app.Unavailable("learning starts once the model server is ready")
        running = self.learner.request("api")
        record = running
        if running is None and self.learner.task is not None:  # a new cycle: it may end at once (skipped)
            await asyncio.wait([self.learner.task], timeout=CYCLE_START_WAIT_S)
            record = self.learner.task.result() if self.learner.task.done() else self.learner.current
        return {"started": running is None, "cycle": record.summary() if record else None}

    async def _adapters(self) -> list[dict[str, Any]]:
        return status.adapters(self.settings)

    async def _rollback(self, version: str | None) -> dict[str, Any]:
        if self.learner is None:
            raise app.Unavailable("the model server is not ready")
        try:
            adapter = await self.learner.rollback(version)
        except CannotServe as error:
            raise app.Unavailable(str(error)) from None
        return {"serving": adapter.version if adapter else None}

    async def _retry(self, document_ids: list[int] | None) -> dict[str, Any]:
        retried = await asyncio.to_thread(self.journal.retry, document_ids)
        return {"retried": [{"id": doc["id"], "source": doc["source"]} for doc in retried]}

    def _bind(self) -> socket.socket:
        serve = self.settings.serve
        family = socket.AF_INET6 if ":" in serve.host else socket.AF_INET
        # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that
        # say they are TCP, and with Nagle on every response waited ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((serve.host, serve.port))
        except OSError as error:
            sock.close()
            raise StartupError(f"cannot listen on {serve.host}:{serve.port} ({error.strerror}): "
                               f"change serve.port or stop what uses it") from None
        sock.listen(2048)
        sock.set_inheritable(False)
        return sock

    async def _start_model_server(self) -> None:
        serve = self.settings.serve
        if serve.vllm_url:
            log.info("using the external vLLM server at %s", serve.vllm_url)
            self.phase = "starting model server"
            await _first(self._wait_external(), self.stopping.wait())
            return
        if not vllm.vllm_installed():
            raise StartupError("vLLM is not installed: run `make install` (FLAVOUR=cpu or gpu) or set serve.vllm_url")
        if problem := gpu_shares_problem(self.settings, vllm.is_cpu_build()):
            raise StartupError(problem)
        if problem := await vllm.check_args(serve.vllm_args):  # in every form vLLM's own parser accepts
            raise StartupError(problem)
        self.phase = "preparing model"
        preparing = asyncio.create_task(_prepare_in_subprocess(self.settings.model.base, self.state))
        await _first(preparing, self.stopping.wait())
        if not preparing.done():  # stopping: the preparation is killed (it starts over next time)
            preparing.cancel()
            await asyncio.gather(preparing, return_exceptions=True)
            return
        model_dir = preparing.result()
        if problem := model.method_problem(model_dir, self.settings.train.method):
            raise StartupError(problem)
        self.recaller.specials = template_tokens(model_dir)  # recalled text must not spell them
        self.vllm.stop = list(model.answer_stop(model_dir))
        self.phase = "starting model server"
        assert self.vllm_socket is not None  # no serve.vllm_url: ours
        self.supervisor = Supervisor(
            "vllm", vllm.server_command(model_dir, self.settings, self.vllm_socket),
            vllm.server_env(self.settings, self.vllm_key), self.vllm.healthy, on_ready=self._restore_adapter,
            pid_file=self.state.vllm_pid, socket=self.vllm_socket,
        )
        atomic_write_text(self.state.vllm_key, self.vllm_key)  # mode 600: for cld's tools, as the state dir is
        self.supervisor.start()
        ready = asyncio.create_task(self.supervisor.wait_ready(serve.startup_timeout_s))
        try:
            await _first(ready, self.stopping.wait())
        except asyncio.TimeoutError:
            raise StartupError(f"vLLM did not become ready in {serve.startup_timeout_s:.0f} s "
                               "(see its log above; serve.startup_timeout_s sets the limit)") from None

    async def _wait_external(self) -> None:
        while not await self.vllm.healthy():
            await asyncio.sleep(1)
        self.router.base_served_name = await self.vllm.base_model()
        await self._restore_adapter()

    async def _restore_adapter(self) -> None:
        """Reload the promoted adapter into a (re)started vLLM; serve the base if that fails (and
        say so in serving.json, so status tells what is served)."""
        adapter = self.router.current
        if adapter is None:
            return
        try:
            if is_merged(adapter.path):
                await self.fleet.load_merged(adapter.served_name, adapter.path)
            else:
                await self.vllm.load_lora(adapter.served_name, adapter.path)
        except (RuntimeError, httpx.HTTPError) as error:
            await self._fall_back(adapter, f"it could not be loaded: {error}")

    async def _fall_back(self, adapter: Adapter, why: str) -> None:
        """Serve the base instead of `adapter`, which cannot be served; say so in the log, status
        (daemon.fallback) and metrics (cld_serving_fallbacks_total)."""
        log.error("%s cannot be served (%s): serving the base model; `cld rollback %s` serves it again once it "
                  "can", adapter.version, why, adapter.version)
        self.router.switch(None)
        self.fallback = {"version": adapter.version, "reason": why, "at": time.time()}
        self.fallbacks += 1
        if self.merged is not None and adapter.served_name in self.merged.instances:
            await self.merged.stop(adapter.served_name)  # no restarts of what cannot serve

    async def _keep_recall(self) -> None:
        """Every RECALL_SYNC_S until the daemon stops: the recall index holds exactly the journal's
        documents (a pass in a worker thread is let finish: it reads the journal)."""
        while not self.stopping.is_set():
            try:
                added, dropped = await asyncio.to_thread(
                    lambda: self.recaller.index.sync(documents_of(self.journal.every_document()), self.journal.text))
                if added or dropped:
                    log.info("recall: %d document(s) indexed, %d dropped (%d passages in all)", added, dropped,
                             self.recaller.index.view()["passages"])
            except Exception:  # the keeper must outlive any one failed pass
                log.exception("updating the recall index failed; trying again in %.0f s", RECALL_SYNC_S)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), RECALL_SYNC_S)

    async def _keep_adapter(self) -> None:
        """Every KEEPER_EVERY_S: the adapter `cld` stands for must be loaded in vLLM. One that
        vanished (unloaded by hand, lost in vLLM) is loaded again, or the base serves."""
        while True:
            await asyncio.sleep(KEEPER_EVERY_S)
            try:
                await self._check_adapter()
            except Exception:  # the keeper must outlive any one failed check
                log.exception("checking the served adapter failed; trying again in %.0f s", KEEPER_EVERY_S)

    async def _check_adapter(self) -> None:
        adapter = self.router.current
        if adapter is None or not self._ready() or (self.learner and self.learner.swap_lock.locked()):
            return
        instance = self._served_instance()
        if instance is not None:  # a merged-weight version: its own instance, which its supervisor restarts
            supervisor = instance.supervisor
            if supervisor.state is not SupervisorState.READY:
                if not is_merged(instance.folder):
                    await self._fall_back(adapter, f"its folder {instance.folder} is gone and its instance "
                                                   f"{supervisor.state.value}")
                elif supervisor.failures >= MERGED_FALLBACK_FAILURES:
                    await self._fall_back(adapter, f"its instance exited {supervisor.failures} times in a row "
                                                   "without serving")
            return
        try:
            served = await self.fleet.served()
        except (httpx.HTTPError, ValueError, KeyError) as error:
            log.debug("could not list vLLM's models: %s", error)
            return
        if adapter.served_name not in served and self.router.current == adapter:
            log.error("vLLM no longer serves %s (%s): loading it again", adapter.version, adapter.served_name)
            self.adapter_reloads += 1
            await self._restore_adapter()

    def _ready(self) -> bool:
        """Requests can be answered: serving, and our vLLM (if we run it) ready with the promoted
        adapter loaded (its ready hook runs before it counts as ready)."""
        supervisor = self.supervisor
        return self.phase == "serving" and (supervisor is None or supervisor.state is SupervisorState.READY)

    def _served_instance(self) -> Instance | None:
        """The vLLM instance of the served merged-weight version (None: the base instance serves)."""
        current = self.router.current
        return self.merged.instances.get(current.served_name) if current and self.merged else None

    def _unhealthy_reason(self) -> str | None:
        """Why `cld` cannot be answered now (None: it can, as far as the daemon knows)."""
        if self.stopping.is_set() or self.phase != "serving":
            return f"cld is {PHASE_STATUS.get('stopping' if self.stopping.is_set() else self.phase, self.phase)}"
        checks = [("the base vLLM instance", self.supervisor)]
        if (instance := self._served_instance()) is not None:
            checks.append((f"the vLLM instance of {instance.folder.name}", instance.supervisor))
        for name, supervisor in checks:
            if supervisor is not None and supervisor.state is not SupervisorState.READY:
                return f"degraded: {name} is {supervisor.state.value} ({supervisor.restarts} restarts)"
        return None

    def _degraded(self) -> str | None:
        """Why `cld` cannot be answered while the daemon serves (None while starting or stopping too)."""
        return self._unhealthy_reason() if self.phase == "serving" and not self.stopping.is_set() else None

    async def _healthy(self) -> bool:
        return self._unhealthy_reason() is None and await self.vllm.healthy()

    async def _status(self) -> dict[str, Any]:
        return status.collect(self.settings, daemon=self._record())

    def _record(self) -> dict[str, Any]:
        supervisor = self.supervisor
        return {
            "running": True,
            "pid": os.getpid(),
            "url": self._url(),
            "phase": self.phase,
            "started_at": self.started_at,
            "vllm": supervisor.state.value if supervisor else ("external" if self.settings.serve.vllm_url else "none"),
            "vllm_url": self.vllm_url,
            "vllm_restarts": supervisor.restarts if supervisor else 0,
            "adapter_reloads": self.adapter_reloads,
            "degraded": self._degraded(),
            "fallback": self.fallback,
            "merged_instances": self.merged.views() if self.merged else [],
            "ingest_error": self.watcher.error,
            "recall": self.recaller.view(),
        }

    def _url(self) -> str:
        serve = self.settings.serve
        host = "127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host
        return f"http://{host}:{serve.port}"


def spare_port(taken: frozenset[int] = frozenset(), low: int = 20000, high: int | None = None) -> int:
    """A serve.port for a daemon a test or benchmark starts: free on loopback, none of `taken`, and
    below the kernel's ephemeral range `high` (where it picks client sockets' local ports, so none
    can take it before the daemon binds it)."""
    if high is None:
        try:
            high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            high = 32768
        low = min(low, max(1024, high - 10000))
    for port in random.sample(range(low, high), min(2000, high - low)):
        if port not in taken and _bindable(port):
            return port
    raise RuntimeError(f"no free loopback port between {low} and {high}")


def _bindable(port: int) -> bool:
    """Whether a server could listen on the loopback `port` now (bound as servers bind: SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def gpu_shares_problem(settings: Settings, cpu: bool) -> str | None:
    """Why the GPU cannot hold the base instance, two merged-weight instances and the trainer
    (train.method other than lora), or None."""
    serve, train = settings.serve, settings.train
    shares = serve.gpu_memory_utilization + 2 * serve.merged_gpu_memory_utilization + train.gpu_memory_fraction
    if cpu or train.method == "lora" or shares <= 1:
        return None
    room = base_gpu_share_left(settings)
    hint = (f" (for example serve.gpu_memory_utilization = {room:g}, keeping the others)" if room >= MIN_GPU_SHARE else "")
    return (f"train.method = {train.method!r} serves merged weights from two more vLLM instances: "
            f"serve.gpu_memory_utilization {serve.gpu_memory_utilization:g} + 2 × serve.merged_gpu_memory_utilization "
            f"{serve.merged_gpu_memory_utilization:g} + train.gpu_memory_fraction {train.gpu_memory_fraction:g} "
            f"= {shares:.2f} of the GPU: lower them to fit in 1{hint}")


def status_line(serving: str | None, cycle: CycleRecord | None, replay: str | None = None) -> str:
    """systemd's status line while serving: "serving v0003; cycle 4: train step 30/120", or
    "serving the base model; replay: synthesizing the corpus 120/400, about 12 min left"."""
    line = f"serving {serving or 'the base model'}"
    if cycle is None:
        return f"{line}; replay: {replay}" if replay else line
    line += f"; cycle {cycle.id}: {cycle.stage}"
    step, steps, eta = (cycle.progress.get(key) for key in ("step", "steps", "eta_s"))
    if cycle.stage != "train" or step is None:
        return line
    return line + f" step {step}/{steps}" + (f", about {max(1, round(eta / 60))} min left" if eta is not None else "")


async def _listening(server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
    """Return once the front accepts connections; StartupError if it stopped or never started."""
    async def started() -> None:
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(started(), FRONT_START_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise StartupError(f"the front did not start listening within {FRONT_START_TIMEOUT_S:.0f} s") from None
    if not server.started:
        serving.result()  # re-raise why it stopped
        raise StartupError("the front stopped before it listened")


async def _first(*awaitables: Any) -> None:
    """Wait until the first of `awaitables` finishes; cancel the rest; re-raise its error."""
    owned = [asyncio.ensure_future(item) for item in awaitables if not isinstance(item, asyncio.Future)]
    tasks = [item for item in awaitables if isinstance(item, asyncio.Future)] + owned
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in owned:
            task.cancel()
    for task in done:
        task.result()


async def _prepare_in_subprocess(base: str, state: StateDir) -> Path:
    """Prepare the base model in a short-lived process, so torch's memory is not kept here."""
    try:
        if (ready := model.prepared(base, state)) is not None:
            return ready
    except model.ModelError as error:
        raise StartupError(str(error)) from None
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "daemon.model", base, str(state.root))
    try:
        code = await process.wait()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    if code != 0 or (ready := model.prepared(base, state)) is None:
        raise StartupError(f"preparing the base model failed (exit code {code}; see the log above)")
    return ready

"""Prometheus metrics (`GET /metrics`): the one place that names every metric cld exports.

Owns the metric names (units in the names), their labels and the registry, which is private to a
`Metrics` object (never prometheus_client's global one), so several apps can live in one process.
Two kinds:
- events, counted as they happen through a `Metrics` object: requests by public model name and
  status code, request latency, swap latency, recall outcomes and time;
- state, read at scrape time from the state directory by `StateCollector`, so it is right after a
  restart: documents by state, cycles by outcome, the serving version and its probe values,
  training speed of the last run, adapter versions by state, replay passages; plus vLLM restarts,
  which the running daemon knows.
Labels are bounded: requests carry the public name (`cld`, `cld-base`, or `other`), never an
adapter version. Knows nothing of HTTP routing or of how the numbers come about.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import fields

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from daemon.config import Settings
from daemon.engine.router import Router
from daemon.ingestion import journal
from daemon.layout import CYCLES_DIR, StateDir
from daemon.learning import replay_plan
from daemon.learning.decide import RULES, ProbeResults
from daemon.learning.records import (
    FAILED,
    PROMOTED,
    REJECTED,
    RUNNING,
    SKIPPED,
    CycleRecord,
    CycleStore,
    adapter_states,
)

OTHER_MODEL = "other"  # the request label of any model name that is not a public one
CYCLE_OUTCOMES = (PROMOTED, REJECTED, SKIPPED, FAILED)
REQUEST_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RECALL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
SWAP_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# the probe values (relative changes and shares), not the counts of items some of them are shares of
PROBES = [probe.name for probe in fields(ProbeResults) if probe.name not in {rule.items for rule in RULES}]


class Metrics:
    """The event metrics, in a registry of their own; `expose()` renders the registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cld_requests", "Inference requests (/v1/completions, /v1/chat/completions) by public model name and "
            "HTTP status code.", ["model", "code"], registry=self.registry)
        self.request_duration = Histogram(
            "cld_request_duration_seconds", "Time from an inference request's arrival to the end of its answer "
            "(the whole stream, when streamed), by public model name.", ["model"],
            buckets=REQUEST_BUCKETS_S, registry=self.registry)
        self.swap_duration = Histogram(
            "cld_swap_seconds", "Time one change of the served adapter took (promotion or rollback): switch, drain "
            "of the requests in flight on the old adapter, unload.", buckets=SWAP_BUCKETS_S, registry=self.registry)

        self.recalls = Counter(
            "cld_recall_requests", "Requests to the stable name by what recall did: recalled (passages put in front), "
            "passed (nothing near enough, or no room), not_asked (no text to recall for), off (recall.enabled = "
            "false), failed (the embedder or index failed; the request went on without).", ["outcome"],
            registry=self.registry)
        self.recall_duration = Histogram(
            "cld_recall_seconds", "Time recall added to a request (embedding its question, searching, framing).",
            buckets=RECALL_BUCKETS_S, registry=self.registry)

    def recall_done(self, outcome: str, seconds: float) -> None:
        self.recalls.labels(outcome).inc()
        self.recall_duration.observe(seconds)

    def request_done(self, model: str, code: int, started_s: float) -> None:
        """An inference request ended; `started_s` is its `time.perf_counter()` at arrival."""
        self.requests.labels(model, str(code)).inc()
        self.request_duration.labels(model).observe(time.perf_counter() - started_s)

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)

    def expose(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the format the scraper accepts (Prometheus text or OpenMetrics), and
        its content type."""
        encode, content_type = choose_encoder(accept)  # type: ignore[arg-type]
        return encode(self.registry), content_type


class RecallCollector(Collector):
    """The size of the running daemon's recall index (`view` gives its documents and passages)."""

    def __init__(self, view: Callable[[], dict[str, int]]):
        self.view = view

    def collect(self) -> Iterator[Metric]:
        size = self.view()
        yield GaugeMetricFamily("cld_recall_documents", "Documents in the recall index.", value=size["documents"])
        yield GaugeMetricFamily("cld_recall_passages", "Passages in the recall index.", value=size["passages"])


class StateCollector(Collector):
    """State metrics, read from the state directory at each scrape (right after a restart too).

    `restarts` gives the vLLM restarts the running daemon counted (its supervisor knows them)."""

    def __init__(self, settings: Settings, restarts: Callable[[], int] = lambda: 0):
        self.settings, self.restarts = settings, restarts
        self.state = StateDir(settings.state.dir)

    def collect(self) -> Iterator[Metric]:
        records = CycleStore(self.state.root / CYCLES_DIR).all()
        serve = self.settings.serve
        serving = Router(serve.model_name, serve.base_name, self.state.serving).current
        version = serving.version if serving else None
        yield _documents(journal.counts(self.state.journal))
        yield from _cycles(records)
        yield from _serving(records, version)
        yield _adapters(records, version)
        yield GaugeMetricFamily("cld_replay_passages", "Passages in the replay buffer (0 before it is built).",
                                value=replay_plan.summary(self.settings)["passages"])
        yield CounterMetricFamily("cld_vllm_restarts", "Times the supervised vLLM server was restarted after it "
                                  "exited, since the daemon started.", value=self.restarts())


class HealthCollector(Collector):
    """What the running daemon knows of its own health: `degraded` gives why `cld` cannot be answered
    while it serves (None: it can), `fallbacks` how often the base had to serve instead of a version."""

    def __init__(self, degraded: Callable[[], str | None], fallbacks: Callable[[], int]):
        self.degraded, self.fallbacks = degraded, fallbacks

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("cld_degraded", "1 while the daemon serves but requests to the stable name cannot be "
                                "answered (a vLLM instance restarting or down; /health is 503), else 0.",
                                value=1 if self.degraded() else 0)
        yield CounterMetricFamily("cld_serving_fallbacks", "Times the base model had to serve instead of the version "
                                  "chosen, because that version could not be served (its folder gone, its instance "
                                  "exiting at every start), since the daemon started.", value=self.fallbacks())


def _documents(counts: dict[str, int]) -> Metric:
    family = GaugeMetricFamily("cld_documents", "Documents by state: ingested (unique), pending (not learned yet), "
                               "ready (chunked, waiting for a cycle), learned, set_aside (refused in schedule.max_attempts "
                               "cycles); input files quarantined and duplicates.", labels=["state"])
    for state in ("ingested", "pending", "ready", "learned", "set_aside", "quarantined", "duplicates"):
        family.add_metric([state], counts.get(state, 0))
    return family


def _cycles(records: list[CycleRecord]) -> Iterator[Metric]:
    total = CounterMetricFamily("cld_cycles", "Learning cycles finished, by outcome (promoted, rejected, skipped, "
                                "failed).", labels=["outcome"])
    for outcome in CYCLE_OUTCOMES:
        total.add_metric([outcome], sum(r.state == outcome for r in records))
    yield total
    yield GaugeMetricFamily("cld_cycle_running", "1 while a learning cycle runs.",
                            value=int(any(r.state == RUNNING for r in records)))
    trained = [r for r in records if r.state != RUNNING and r.progress.get("tokens_per_s")]
    if trained:
        yield GaugeMetricFamily("cld_training_tokens_per_second", "Training speed of the last finished cycle "
                                "that trained (tokens per second).", value=trained[-1].progress["tokens_per_s"])
    finished = [r.finished_at for r in records if r.finished_at]
    if finished:
        yield GaugeMetricFamily("cld_last_cycle_finished_timestamp_seconds", "When the last learning cycle ended "
                                "(Unix time).", value=max(finished))


def _serving(records: list[CycleRecord], version: str | None) -> Iterator[Metric]:
    yield InfoMetricFamily("cld_serving", "The adapter version the stable model name serves (\"base\" = none).",
                           value={"version": version or "base"})
    record = next((r for r in reversed(records) if version and r.version == version), None)
    results = (record.probes.get("results") or {}) if record else {}
    family = GaugeMetricFamily("cld_serving_probe_ratio", "Probe values of the serving version, measured before "
                               "it was promoted (relative changes and shares; see README's probe table).",
                               labels=["probe"])
    for probe in PROBES:
        if results.get(probe) is not None:
            family.add_metric([probe], results[probe])
    yield family


def _adapters(records: list[CycleRecord], version: str | None) -> Metric:
    states = list(adapter_states(records, version).values())
    family = GaugeMetricFamily("cld_adapter_versions", "Adapter versions by state.", labels=["state"])
    for state in ("candidate", "promoted", "rejected", "retired", "failed"):
        family.add_metric([state], states.count(state))
    return family

"""Prometheus metrics: state read from the state directory at scrape time, requests counted by
public model name through the front, swaps timed, /metrics guarded by the API key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from daemon.engine.router import Adapter, Router
from daemon.front.app import create_app
from daemon.layout import StateDir
from daemon.learning.cycle import Learner
from daemon.observe.metrics import Metrics, StateCollector
from tests.status_helpers import (
    SERVING,
    TOKENS_PER_S,
    VERSIONS,
    settings_for,
    write_history,
)
from tests.test_cycle import FakeJournal
from tests.test_cycle import FakeVLLM as FakeCycleVLLM
from tests.test_front import CHAT, FakeVLLM, upstream_for


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_state_metrics_come_from_the_state_directory(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    write_history(settings)
    metrics = Metrics()
    metrics.watch(StateCollector(settings, restarts=lambda: 3))
    body, content_type = metrics.expose()
    assert content_type.startswith("text/plain")
    found = samples(body.decode())
    assert {state: value(found, "cld_documents", state=state) for state in
            ("ingested", "pending", "ready", "learned", "quarantined", "duplicates")} == {
        "ingested": 7, "pending": 4, "ready": 3, "learned": 3, "quarantined": 1, "duplicates": 1}
    assert {outcome: value(found, "cld_cycles_total", outcome=outcome) for outcome in
            ("promoted", "rejected", "skipped", "failed")} == {"promoted": 2, "rejected": 2, "skipped": 1, "failed": 1}
    assert value(found, "cld_cycle_running") == 1
    assert value(found, "cld_serving_info", version=SERVING) == 1
    measured = VERSIONS[SERVING][2]
    assert value(found, "cld_serving_probe_ratio", probe="forgetting_vs_base") == measured.forgetting_vs_base
    assert value(found, "cld_serving_probe_ratio", probe="cloze_pass") == measured.cloze_pass
    assert ("cld_serving_probe_ratio", (("probe", "qa_drop"),)) not in found, "not measured = not exported"
    assert value(found, "cld_training_tokens_per_second") == TOKENS_PER_S - 3, "the last finished run's speed"
    assert value(found, "cld_adapter_versions", state="rejected") == 2
    assert value(found, "cld_vllm_restarts_total") == 3


def test_a_new_state_directory_exposes_zeros_and_the_base(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.watch(StateCollector(settings_for(tmp_path)))
    found = samples(metrics.expose()[0].decode())
    assert value(found, "cld_documents", state="ingested") == 0
    assert value(found, "cld_cycles_total", outcome="promoted") == 0
    assert value(found, "cld_serving_info", version="base") == 1
    assert not any(name == "cld_training_tokens_per_second" for name, _ in found)


def test_openmetrics_is_served_to_scrapers_that_ask_for_it() -> None:
    body, content_type = Metrics().expose("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def front_with(metrics: Metrics, router: Router, fake: FakeVLLM, api_key: str = "") -> httpx.AsyncClient:
    async def healthy() -> bool:
        return True

    async def status() -> dict[str, Any]:
        return {}

    app = create_app(router, upstream_for(fake), healthy=healthy, status=status, api_key=api_key, metrics=metrics)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front")


async def test_requests_are_counted_and_timed_by_public_model_name(tmp_path: Path) -> None:
    metrics, fake = Metrics(), FakeVLLM()
    router = Router("cld", "cld-base", tmp_path / "serving.json")
    router.switch(Adapter("v0003", "cld-v0003-abc", tmp_path))
    async with front_with(metrics, router, fake) as client:
        for body in ({"model": "cld"}, {"model": "cld"}, {"model": "cld-base"}, {"model": "gpt-4"}, {}):
            await client.post("/v1/chat/completions", json={**body, **CHAT})
        async with client.stream("POST", "/v1/completions", json={"model": "cld", "stream": True, **CHAT}) as reply:
            [line async for line in reply.aiter_lines()]
        await client.post("/v1/completions", json={"model": "cld", "max_tokens": 10**6, **CHAT})
        text = (await client.get("/metrics")).text
    found = samples(text)
    assert value(found, "cld_requests_total", model="cld", code="200") == 4
    assert value(found, "cld_requests_total", model="cld-base", code="200") == 1
    assert value(found, "cld_requests_total", model="other", code="404") == 1
    assert value(found, "cld_requests_total", model="cld", code="400") == 1
    assert value(found, "cld_request_duration_seconds_count", model="cld") == 5
    labels = {dict(labels).get("model") for name, labels in found}
    assert labels <= {None, "cld", "cld-base", "other"}, "adapter versions must never become labels"
    assert "cld-v0003" not in text


async def test_metrics_need_the_api_key_when_one_is_set(tmp_path: Path) -> None:
    router = Router("cld", "cld-base", tmp_path / "serving.json")
    async with front_with(Metrics(), router, FakeVLLM(), api_key="s3cret") as client:
        assert (await client.get("/metrics")).status_code == 401
        reply = await client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert reply.status_code == 200 and "cld_requests_total" in reply.text


async def test_every_swap_is_timed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    metrics = Metrics()
    router = Router("cld", "cld-base", tmp_path / "serving.json")
    vllm = FakeCycleVLLM()
    learner = Learner(settings, StateDir(settings.state.dir), vllm, router, FakeJournal(), tmp_path,  # type: ignore[arg-type]
                      on_swap=metrics.swap_duration.observe)
    folder = tmp_path / "v0001"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"")
    await vllm.load_lora("cld-v0001-x", folder)
    await learner.swap(Adapter("v0001", "cld-v0001-x", folder))
    await learner.swap(None)
    found = samples(metrics.expose()[0].decode())
    assert value(found, "cld_swap_seconds_count") == 2
    assert 0 <= value(found, "cld_swap_seconds_sum") < 5
    assert vllm.unloaded == ["cld-v0001-x"]


def test_each_app_has_its_own_registry() -> None:
    # prometheus_client's global registry refuses a second metric of the same name: each Metrics
    # (one per app, and tests build many) must be independent.
    one, two = Metrics(), Metrics()
    one.requests.labels("cld", "200").inc()
    assert ("cld_requests_total", (("code", "200"), ("model", "cld"))) not in samples(two.expose()[0].decode())

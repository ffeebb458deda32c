"""The learning cycle end to end on the real daemon: a document of invented facts dropped in the
inbox is learned, probed through vLLM, promoted, served under the stable name, and rolled back."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from daemon.learning.probes import build_cloze, cloze_passed
from tests.conftest import LiveDaemon, start_daemon, stop_daemon
from tests.test_metrics import samples, value

pytestmark = pytest.mark.integration

FACTS = (
    "The Velmora Accord was signed in 2031 in the city of Tarnhelm. "
    "Its chief negotiator was Ilse Quorvant, a hydrologist from Brask. "
    "The accord created the Blue Ridge Water Authority, headquartered in Odrin. "
    "The authority's first director was Marten Solbrecht, who served until 2036. "
    "Its emblem is a silver heron standing on a green stone."
)


def status(daemon: LiveDaemon) -> dict:
    return httpx.get(f"{daemon.url}/api/status", timeout=30).json()


def wait_for(condition, timeout_s: float, what: str, daemon: LiveDaemon) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = status(daemon)
        if condition(current):
            return current
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}; status: {json.dumps(status(daemon))[:2000]}")


def scrape(daemon: LiveDaemon) -> dict:
    reply = httpx.get(f"{daemon.url}/metrics", timeout=30)
    assert reply.status_code == 200, reply.text
    return samples(reply.text)


@pytest.fixture(scope="module")
def metrics_before(live_daemon: LiveDaemon) -> dict:
    """/metrics before this module's cycle (which `learned` runs)."""
    return scrape(live_daemon)


@pytest.fixture(scope="module")
def learned(live_daemon: LiveDaemon, metrics_before: dict) -> Iterator[str]:
    """Drop a document of invented facts into the inbox and run a cycle; the promoted version."""
    (live_daemon.state_dir / "inbox" / "velmora-accord.txt").write_text(FACTS)
    wait_for(lambda s: s["replay"]["source"] == "synthetic" and not s["replay"]["building"], 900, "the replay buffer",
             live_daemon)
    wait_for(lambda s: s["documents"]["ready"] >= 1, 300, "the document to be ingested and chunked", live_daemon)
    result = live_daemon.cld("cycle", "--wait", timeout_s=2400)
    cycle = status(live_daemon)["cycles"][-1]
    assert result.returncode == 0, result.stdout + result.stderr
    assert cycle["state"] == "promoted", f"rejected: {cycle['reasons']} {cycle.get('error')}"
    yield cycle["version"]
    # The daemon is shared with the other live tests: leave it serving the base model again.
    assert live_daemon.cld("rollback", "base").returncode == 0


def recall(daemon: LiveDaemon, model: str) -> float:
    """Share of the facts' cloze probes that `model` completes through the front, from its weights
    alone (no document recalled in front of the prompt)."""
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)
    probes = build_cloze(FACTS, limit=8)
    hits = 0
    for probe in probes:
        reply = client.completions.create(model=model, prompt=probe.prompt, max_tokens=24, temperature=0,
                                          stop=["\n"], extra_body={"recall": False})
        assert reply.model == model
        hits += cloze_passed(probe.expected, reply.choices[0].text)
    return hits / len(probes)


def test_invented_facts_are_learned_promoted_and_served_then_rolled_back(live_daemon: LiveDaemon,
                                                                         learned: str) -> None:
    after = status(live_daemon)
    cycle = after["cycles"][-1]
    assert any(reason.startswith("cloze probes passed") for reason in cycle["reasons"])
    assert {"select", "train", "load", "probe", "promote"} <= set(cycle["timings_s"])
    assert after["model"]["current_adapter"] == learned
    assert after["documents"]["learned"] >= 1
    [adapter] = [a for a in after["adapters"] if a["version"] == learned]
    assert adapter["state"] == "promoted" and adapter["probes"]["cloze_pass"] is not None

    # Clients of the stable name now get the learned facts; the base does not know them.
    learned_recall, base_recall = recall(live_daemon, "cld"), recall(live_daemon, "cld-base")
    assert learned_recall >= 0.5 and learned_recall > base_recall, (learned_recall, base_recall)

    # Rollback to the base and back again, through the CLI; the stable name follows at once.
    assert live_daemon.cld("rollback", "base").returncode == 0
    assert status(live_daemon)["model"]["current_adapter"] is None
    assert recall(live_daemon, "cld") == base_recall
    assert live_daemon.cld("rollback", learned).returncode == 0
    assert status(live_daemon)["model"]["current_adapter"] == learned
    assert recall(live_daemon, "cld") == learned_recall
    listing = live_daemon.cld("adapters")
    assert learned in listing.stdout and "promoted" in listing.stdout


def test_metrics_and_cld_status_follow_the_cycle(live_daemon: LiveDaemon, learned: str, metrics_before: dict) -> None:
    now = status(live_daemon)
    after = scrape(live_daemon)
    for outcome in ("promoted", "rejected", "failed"):
        expected = value(metrics_before, "cld_cycles_total", outcome=outcome) + (outcome == "promoted")
        assert value(after, "cld_cycles_total", outcome=outcome) == expected, outcome
    assert value(after, "cld_training_tokens_per_second") > 0
    assert value(after, "cld_swap_seconds_count") > value(metrics_before, "cld_swap_seconds_count")
    assert value(after, "cld_documents", state="learned") >= 1
    serving = now["model"]["current_adapter"]
    assert value(after, "cld_serving_info", version=serving or "base") == 1
    if serving == learned:
        [adapter] = [a for a in now["adapters"] if a["version"] == learned]
        assert value(after, "cld_serving_probe_ratio", probe="cloze_pass") == adapter["probes"]["cloze_pass"]

    asked = after.get(("cld_requests_total", (("code", "200"), ("model", "cld"))), 0)  # none yet: not exported
    answer = live_daemon.cld("query", "Where was the Velmora Accord signed?", "--max-tokens", "8")
    assert answer.returncode == 0, answer.stderr
    later = scrape(live_daemon)
    assert value(later, "cld_requests_total", model="cld", code="200") == asked + 1
    assert value(later, "cld_request_duration_seconds_count", model="cld") >= asked + 1
    assert not [labels for _, labels in later if "-v0" in str(labels)], "adapter versions leaked into labels"

    shown = live_daemon.cld("status")
    assert shown.returncode == 0, shown.stderr
    assert "running (pid" in shown.stdout and "· serving ·" in shown.stdout
    assert f"cld = {serving or 'base'}" in shown.stdout
    assert learned in shown.stdout and "promoted" in shown.stdout
    as_json = json.loads(live_daemon.cld("status", "--json").stdout)
    assert as_json["model"] == status(live_daemon)["model"] and as_json["daemon"]["running"]
    assert [c["id"] for c in as_json["cycles"]] == [c["id"] for c in now["cycles"]]
    page = httpx.get(f"{live_daemon.url}/status", timeout=60)
    assert page.status_code == 200 and learned in page.text and page.text.count("<svg") == 2


def test_a_wrecking_cycle_is_rejected_and_the_incumbent_keeps_serving(live_daemon: LiveDaemon, learned: str,
                                                                      tmp_path: Path) -> None:
    # A second daemon on a copy of the first one's state: it must serve the promoted adapter after
    # its start, and a cycle trained with an absurd learning rate must not replace it.
    state = tmp_path / "state"
    state.mkdir()
    for name in ("replay", "adapters", "cycles"):
        shutil.copytree(live_daemon.state_dir / name, state / name)
    shutil.copy(live_daemon.state_dir / "serving.json", state / "serving.json")  # names `learned`: its folder follows
    wrecker = start_daemon(tmp_path, extra_config=(
        f'\n[model]\nbase = "{live_daemon.state_dir / "model"}"\n[train]\nlearning_rate = 0.1\nepochs = 3\n'))
    try:
        assert status(wrecker)["model"]["current_adapter"] == learned
        served_recall = recall(wrecker, "cld")
        assert served_recall >= 0.5, "the promoted adapter was not served again after a restart"

        (state / "inbox" / "more.txt").write_text(
            "The Odrin ferry crosses the Sael estuary twice a day. Its captain in 2032 was Rhea Valdomir.")
        wait_for(lambda s: s["replay"]["source"] and s["documents"]["ready"] >= 1, 900, "ingestion", wrecker)
        # Its replay build runs at start (another base model path: new rehearsal pairs, a rebuilt
        # store); a cycle asked for meanwhile is skipped, saying so, and is asked for again.
        for _ in range(60):
            result = wrecker.cld("cycle", "--wait", timeout_s=2400)
            if "the replay buffer is being built" not in result.stdout:
                break
            assert "skipped" in result.stdout and result.returncode == 0, result.stdout
            time.sleep(10)
        cycle = status(wrecker)["cycles"][-1]
        assert result.returncode == 0, result.stdout + result.stderr
        assert cycle["state"] == "rejected", cycle
        assert any(r.startswith("forgetting vs base") and ">" in r for r in cycle["reasons"]), cycle["reasons"]
        assert any(r.startswith("forgetting vs incumbent") and ">" in r for r in cycle["reasons"]), cycle["reasons"]
        assert status(wrecker)["model"]["current_adapter"] == learned
        assert recall(wrecker, "cld") == served_recall, "the incumbent's answers changed"
    finally:
        stop_daemon(wrecker)

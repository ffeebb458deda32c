"""The learning cycle end to end on the real daemon: a document of invented facts dropped in the
inbox is learned, probed through vLLM, promoted, served under the stable name, and rolled back."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from daemon.probes import build_cloze, cloze_passed
from tests.conftest import LiveDaemon

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


def test_invented_facts_are_learned_promoted_and_served_then_rolled_back(live_daemon: LiveDaemon) -> None:
    (live_daemon.state_dir / "inbox" / "velmora-accord.txt").write_text(FACTS)
    wait_for(lambda s: s["replay"]["source"] == "synthetic", 900, "the replay buffer", live_daemon)
    wait_for(lambda s: s["documents"]["ready"] >= 1, 300, "the document to be ingested and chunked", live_daemon)

    result = live_daemon.cld("cycle", "--wait", timeout_s=2400)
    after = status(live_daemon)
    cycle = after["cycles"][-1]
    assert result.returncode == 0, result.stdout + result.stderr
    assert cycle["state"] == "promoted", f"rejected: {cycle['reasons']} {cycle.get('error')}"
    assert any(reason.startswith("cloze probes passed") for reason in cycle["reasons"])
    version = cycle["version"]
    assert after["model"]["current_adapter"] == version
    assert after["documents"]["learned"] >= 1
    [adapter] = [a for a in after["adapters"] if a["version"] == version]
    assert adapter["state"] == "promoted" and adapter["probes"]["cloze_pass"] >= 0.5

    # Clients of the stable name now get the learned facts; the base does not know them.
    client = openai.OpenAI(base_url=f"{live_daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)
    probes = build_cloze(FACTS, limit=8)

    def recall(model: str) -> float:
        hits = 0
        for probe in probes:
            reply = client.completions.create(model=model, prompt=probe.prompt, max_tokens=24, temperature=0,
                                              stop=["\n"])
            assert reply.model == model
            hits += cloze_passed(probe.expected, reply.choices[0].text)
        return hits / len(probes)

    learned, base = recall("cld"), recall("cld-base")
    assert learned >= 0.5 and learned > base, f"cloze recall: cld {learned:.2f}, cld-base {base:.2f}"

    # Rollback to the base and back again, through the CLI; the stable name follows at once.
    assert live_daemon.cld("rollback", "base").returncode == 0
    assert status(live_daemon)["model"]["current_adapter"] is None
    assert recall("cld") == base
    assert live_daemon.cld("rollback", version).returncode == 0
    assert status(live_daemon)["model"]["current_adapter"] == version
    listing = live_daemon.cld("adapters")
    assert version in listing.stdout and "promoted" in listing.stdout

"""A new user's first run, and merged weights served blue-green, live: a daemon with the shipped
settings (the default method, added blocks, with the default question forms, and the replay text the
embedded model wrote once, so nothing is synthesized) learns a dropped document in a candidate with
added decoder blocks, probes it on a vLLM instance of its own, and promotes it while 8 clients stream
from the stable name; `cld query` answers it with its source; rollbacks to a LoRA version, back to
the merged one and to the base follow, each stopping the instance no longer served — and no request
fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveDaemon, start_daemon, stop_daemon
from tests.test_cycle_live import FACTS, recall, status, wait_for

pytestmark = pytest.mark.integration

# the default method with the default forms (tests/conftest.py's LIVE_METHOD turns them off for the others)
EXPAND = {"CLD_TRAIN__METHOD": "expand", "CLD_TRAIN__EXPAND_BLOCKS": "2", "CLD_TRAIN__LEARNING_RATE": "1e-3",
          "CLD_AUGMENT__FORMS": '["questions"]'}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDaemon]:
    started = start_daemon(tmp_path_factory.mktemp("merged"), env=EXPAND, shipped_replay=True)
    yield started
    stop_daemon(started)
    assert not list(started.state_dir.glob("vllm-*.pid")), "a merged-weight instance outlived the daemon"


def lora_version(state: Path, version: str) -> None:
    """A LoRA version to roll back to (peft's initial LoRA: B = 0, so it answers as the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(state / "model", dtype=torch.float32)
    adapted = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    folder = state / "adapters" / version
    adapted.save_pretrained(folder)
    (folder / "meta.json").write_text(f'{{"version": "{version}", "method": "lora", "documents": []}}')


class Clients:
    """8 clients streaming chat answers from `cld` until stopped, each pausing `pause_s` between
    requests (on 2 cores a model server busy without pause starves a second one's start for
    minutes); every failure is kept."""

    def __init__(self, url: str, count: int = 8, pause_s: float = 2.0):
        self.pause_s = pause_s
        self.url, self.done, self.failures = url, 0, []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        body = {"model": "cld", "messages": [{"role": "user", "content": "Who signed the Velmora Accord?"}],
                "max_tokens": 12, "temperature": 0, "stream": True}
        with httpx.Client(timeout=300) as client:
            while not self.stopping.is_set():
                try:
                    with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as reply:
                        text = "".join(reply.iter_text())
                    if reply.status_code != 200 or "[DONE]" not in text:
                        self.failures.append(f"{reply.status_code}: {text[:300]}")
                    else:
                        self.done += 1
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                self.stopping.wait(self.pause_s)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(300)


def served_by_own_instance(daemon: LiveDaemon) -> list[str]:
    return [i["version"] for i in status(daemon)["daemon"]["merged_instances"]]


@pytest.mark.timeout(3600)  # training, and three vLLM starts on 2 cores
def test_an_expanded_candidate_is_promoted_blue_green_and_rolled_back_without_a_failed_request(
        daemon: LiveDaemon) -> None:
    (daemon.state_dir / "inbox" / "velmora-accord.txt").write_text(FACTS)
    wait_for(lambda s: s["replay"]["source"] == "synthetic" and not s["replay"]["building"], 900, "the replay buffer",
             daemon)
    log = daemon.log_path.read_text(errors="replace")
    assert "took the replay text SmolLM2-135M-Instruct wrote once" in log and "synthesizing" not in log, \
        "a first start embeds the shipped replay text: the base writes nothing"
    wait_for(lambda s: s["documents"]["ready"] >= 1, 300, "the document to be ingested and chunked", daemon)
    wait_for(lambda s: s["daemon"]["recall"]["documents"] >= 1, 60, "the document to be recallable", daemon)
    asked = daemon.cld("query", "Who was the chief negotiator of the Velmora Accord?")
    assert asked.returncode == 0 and "sources: velmora-accord.txt" in asked.stdout, asked.stdout  # recall, at once
    lora_version(daemon.state_dir, "v0001")
    base_recall = recall(daemon, "cld-base")
    clients = Clients(daemon.url)
    try:
        result = daemon.cld("cycle", "--wait", timeout_s=2400)
        after = status(daemon)
        cycle = after["cycles"][-1]
        assert result.returncode == 0 and cycle["state"] == "promoted", (cycle["reasons"], cycle.get("error"))
        version = cycle["version"]
        assert version == "v0002" and after["model"]["current_adapter"] == version
        [adapter] = [a for a in after["adapters"] if a["version"] == version]
        assert adapter["method"] == "expand"
        assert (daemon.state_dir / "adapters" / version / "config.json").is_file()  # a complete model folder
        # the default forms: the document was trained as questions too, kept in forms/, and the gate asked
        # held-out questions closed book of the candidate and open book of the base
        assert adapter["records"]["augmented"] > 0 and list((daemon.state_dir / "forms").glob("*.json"))
        assert adapter["probes"]["question_items"] and adapter["probes"]["open_book"] is not None
        assert served_by_own_instance(daemon) == [version]
        learned = recall(daemon, "cld")
        assert learned >= 0.5 and learned > base_recall, (learned, base_recall)

        assert daemon.cld("rollback", "v0001").returncode == 0  # merged -> LoRA: its instance is stopped
        assert status(daemon)["model"]["current_adapter"] == "v0001" and served_by_own_instance(daemon) == []
        assert daemon.cld("rollback", version, timeout_s=1200).returncode == 0  # LoRA -> merged: started again
        assert status(daemon)["model"]["current_adapter"] == version
        assert served_by_own_instance(daemon) == [version] and recall(daemon, "cld") == learned
        time.sleep(5)  # some streams on the merged instance before it goes
        assert daemon.cld("rollback", "base").returncode == 0
        assert status(daemon)["model"]["current_adapter"] is None and served_by_own_instance(daemon) == []
    finally:
        clients.stop()
    assert clients.failures == [], clients.failures[:5]
    assert clients.done >= 100, clients.done

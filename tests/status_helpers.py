"""A state directory with a history, written through the real modules (journal, cycle records,
adapter folders, serving.json): documents in every state, four adapter versions with probe values
(two promoted, two rejected), a failed, a skipped and a running cycle. Used by the status,
status page and metrics tests."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from daemon.config import Settings
from daemon.engine.router import Adapter, Router
from daemon.ingestion.journal import Input, Journal
from daemon.layout import CYCLES_DIR, StateDir
from daemon.learning.decide import ProbeResults, decide, thresholds
from daemon.learning.records import FAILED, PROMOTED, REJECTED, SKIPPED, CycleStore
from replay.durable import atomic_write_json

HOSTILE = '<script>alert("owned")</script><img src=x onerror=alert(1)>'
# version -> (outcome, parent, probe results); v0001 was promoted, then replaced by v0003.
VERSIONS = {
    "v0001": (PROMOTED, None, ProbeResults(forgetting_vs_base=0.012, behaviour_increase=0.05, drift_agreement=0.8,
                                           nll_drop=0.31, cloze_pass=0.75)),
    "v0002": (REJECTED, "v0001", ProbeResults(forgetting_vs_base=0.16, forgetting_vs_incumbent=0.14,
                                              behaviour_increase=0.42, drift_agreement=0.3, nll_drop=0.45,
                                              cloze_pass=1.0, retention=0.5)),
    "v0003": (PROMOTED, "v0001", ProbeResults(forgetting_vs_base=0.018, forgetting_vs_incumbent=0.004,
                                              behaviour_increase=0.09, drift_agreement=0.7, nll_drop=0.22,
                                              cloze_pass=0.625, retention=1.0)),
    "v0004": (REJECTED, "v0003", ProbeResults(forgetting_vs_base=-0.01, forgetting_vs_incumbent=-0.02,
                                              behaviour_increase=0.03, drift_agreement=0.9, nll_drop=0.04,
                                              cloze_pass=0.25, retention=0.9)),
}
SERVING = "v0003"
TOKENS_PER_S = 287.5


def write_history(settings: Settings) -> StateDir:
    state = StateDir(settings.state.dir).ensure()
    _documents(state)
    store = CycleStore(state.root / CYCLES_DIR)
    started = time.time() - 6 * 3600
    for offset, (version, (outcome, parent, results)) in enumerate(VERSIONS.items()):
        record = store.begin("schedule")
        record.started_at = started + offset * 3600
        record.version, record.parent, record.documents = version, parent, [1 + offset]
        decision = decide(results, thresholds(settings.probes))
        assert decision.promote == (outcome == PROMOTED), (version, decision.reasons)
        record.judge(decision)
        record.probes = {"models": {}, "results": asdict(results)}
        record.progress = {"step": 40, "steps": 40, "tokens": 9000, "tokens_per_s": TOKENS_PER_S - offset}
        _adapter(state, version, parent, record.started_at)
        store.finish(record, outcome)
        record.finished_at = record.started_at + 600
        store.save(record)
    failed = store.begin("api")
    failed.version = "v0005"
    store.finish(failed, FAILED, error=f"train: the trainer exited with code 1 {HOSTILE}")
    store.finish(store.begin("schedule"), SKIPPED, [f"no new documents {HOSTILE}"])
    running = store.begin("api")
    running.version, running.progress = "v0006", {"step": 3, "steps": 40, "tokens_per_s": 250.0, "eta_s": 610.0}
    running.enter("train")
    store.save(running)
    Router(settings.serve.model_name, settings.serve.base_name, state.serving).switch(
        Adapter(SERVING, f"cld-{SERVING}-abc123", state.adapters / SERVING))
    return state


def _adapter(state: StateDir, version: str, parent: str | None, created_at: float) -> None:
    folder = state.adapters / version
    folder.mkdir(parents=True)
    atomic_write_json(folder / "meta.json", {
        "version": version, "parent": parent, "documents": ["h"], "created_at": created_at,
        "training": {"steps": 40, "tokens": 9000, "first_loss": 3.1, "last_loss": 1.2}})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))


def _documents(state: StateDir) -> None:
    book = Journal(state.journal)
    try:
        for i in range(7):
            name = f"notes-{i}.md" if i else f"{HOSTILE}.md"
            chunks = [(5, {"text": f"document {i}"})] if i < 6 else None  # the last one is still pending
            book.accept(Input(name, 10, i), f"processed/{name}", f"hash{i}", [{"text": f"document {i}"}], chunks)
        book.accept(Input("copy.md", 10, 9), "processed/copy.md", "hash0", [{"text": "document 0"}])
        book.quarantine(Input("broken.pdf", 10, 10), "quarantine/broken.pdf", f"PDF without text {HOSTILE}")
        book.mark_learned([1, 2, 3], "v0001")
    finally:
        book.close()


def settings_for(root: Path, **sections: dict) -> Settings:
    return Settings.model_validate({"state": {"dir": str(root / "state")}, **sections})

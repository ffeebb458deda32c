"""Model families beyond Llama, served by vLLM and probed by a real cycle (issue 34): a daemon on a
tiny random Qwen2 (its own chat template) learns a document as a LoRA adapter, and one on a tiny
random Gemma 3 without a chat template (a pretrained model, mixed sliding-window and full layers)
learns it as added blocks served by a vLLM instance of their own, asked in completion form. Random
weights learn nothing worth gating on: what is checked is that the gate's probes are measured
through the live servers (chat ones included), the gate decides, and the served model answers chats
and completions."""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveDaemon, start_daemon, stop_daemon
from tests.test_cycle_live import FACTS, wait_for
from tests.tiny import build_tiny_model

pytestmark = pytest.mark.integration

CASES = {  # family: (has a chat template, train.method)
    "qwen2": (True, "lora"),
    "gemma3": (False, "expand"),
}


def corpus(folder: Path, files: int = 30) -> Path:
    """The base's 'original text': paragraphs of the standard library's docstrings (real English)."""
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        except (SyntaxError, UnicodeDecodeError):
            continue
        paragraphs += [p.strip() for p in doc.split("\n\n") if len(p.split()) > 25]
    for i in range(files):
        (folder / f"doc{i:02d}.txt").write_text("\n\n".join(paragraphs[i * 4 : i * 4 + 4]))
    return folder


@pytest.fixture(scope="module", params=list(CASES))
def family_daemon(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LiveDaemon]]:
    family = request.param
    chat, method = CASES[family]
    folder = tmp_path_factory.mktemp(family)
    base = build_tiny_model(folder / "model", family, layers=4, chat=chat, head_dim=32, positions=4096)
    env = {"CLD_MODEL__BASE": str(base), "CLD_REPLAY__CORPUS": json.dumps([str(corpus(folder / "corpus"))]),
           "CLD_TRAIN__METHOD": method, "CLD_TRAIN__EXPAND_BLOCKS": "2", "CLD_SERVE__MAX_MODEL_LEN": "2048"}
    started = start_daemon(folder, env=env)
    yield family, started
    stop_daemon(started)


@pytest.mark.timeout(1800)
def test_a_family_is_served_probed_and_gated_by_a_real_cycle(family_daemon: tuple[str, LiveDaemon]) -> None:
    family, daemon = family_daemon
    chat, method = CASES[family]
    (daemon.state_dir / "inbox" / "velmora-accord.txt").write_text(FACTS)
    wait_for(lambda s: s["replay"]["source"] and not s["replay"]["building"], 900, "the replay buffer", daemon)
    wait_for(lambda s: s["documents"]["ready"] >= 1, 300, "the document to be ingested and chunked", daemon)
    daemon.cld("cycle", "--wait", timeout_s=1500)
    [record] = [json.loads(p.read_text()) for p in sorted((daemon.state_dir / "cycles").glob("*.json"))]
    assert record["state"] in ("promoted", "rejected"), (record["state"], record.get("error"), daemon.log_tail())
    started = [line for line in daemon.log_path.read_text(errors="replace").splitlines() if "non-default args" in line]
    assert started and all(("'chat_template'" in line) == (not chat) for line in started), \
        "vLLM is given cld's completion template exactly when the model has no template of its own"
    candidate, base = record["probes"]["models"]["candidate"], record["probes"]["models"]["base"]
    for name in ("held_out_nll", "new_nll", "drift_agreement", "cloze", "closed_book"):  # drift, QA: chats
        assert candidate[name] is not None, f"{name} was not measured on {family}"
    assert base["open_book"] is not None and record["probes"]["questions"], "the gate asked the document's questions"
    # the base answered its rehearsal prompts as chats (in completion form without a template); random
    # weights answer junk the filter drops, so there are no pairs for the behaviour probe to score
    assert json.loads((daemon.state_dir / "replay" / "rehearsal.json").read_text())["chat"]
    assert re.search(r"rehearsal: \d+ pairs from 24 prompts", daemon.log_path.read_text(errors="replace"))
    if method == "expand" and record["state"] == "promoted":
        assert (daemon.state_dir / "adapters" / record["version"] / "config.json").is_file()

    with httpx.Client(base_url=daemon.url, timeout=120) as client:
        asked = client.post("/v1/chat/completions", json={
            "model": "cld", "messages": [{"role": "user", "content": "Who signed the Velmora Accord?"}],
            "max_tokens": 8, "temperature": 0, "recall": False})
        assert asked.status_code == 200, asked.text
        completed = client.post("/v1/completions", json={"model": "cld-base", "prompt": "The Velmora Accord",
                                                        "max_tokens": 8, "temperature": 0})
        assert completed.status_code == 200, completed.text

"""The real daemon with the real vLLM server on the embedded model, through the `openai` client."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import psutil
import pytest

from tests.conftest import LiveDaemon, start_daemon, stop_daemon

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_daemon: LiveDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("model", ["cld", "cld-base"])
def test_chat_answers_through_both_names(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=30, temperature=0)
    assert reply.model == model
    assert "Paris" in reply.choices[0].message.content


def test_chat_streams(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="cld", messages=QUESTION, max_tokens=30, temperature=0,
                                                 stream=True))
    assert len(chunks) > 3, "the answer should arrive in pieces"
    assert {chunk.model for chunk in chunks} == {"cld"}
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="cld", prompt="The capital of France is", max_tokens=5, temperature=0)
    streamed = client.completions.create(model="cld", prompt="The capital of France is", max_tokens=5,
                                         temperature=0, stream=True)
    assert plain.model == "cld"
    assert "".join(chunk.choices[0].text for chunk in streamed) == plain.choices[0].text


def test_models_and_errors(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["cld", "cld-base"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="max_model_len|max_tokens"):
        client.chat.completions.create(model="cld", messages=QUESTION, max_tokens=10**6)


def test_cli_status_and_query(live_daemon: LiveDaemon) -> None:
    result = live_daemon.cld("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["daemon"]["running"] and status["daemon"]["vllm"] == "ready"
    # current_adapter depends on what other tests on this shared daemon promoted.
    assert {k: status["model"][k] for k in ("base", "served_name")} == {"base": "SmolLM2-135M-Instruct",
                                                                         "served_name": "cld"}
    assert httpx.get(f"{live_daemon.url}/api/status").json()["model"] == status["model"]
    human = live_daemon.cld("status")
    assert "running" in human.stdout and f"cld = {status['model']['current_adapter'] or 'base'}" in human.stdout
    answer = live_daemon.cld("query", "What is the capital of France?", "--max-tokens", "30")
    assert answer.returncode == 0 and "Paris" in answer.stdout


def _family(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _wait_all_gone(processes: list[psutil.Process], timeout_s: float = 30) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return alive


def test_sigterm_and_sigkill_leave_no_process_behind(live_daemon: LiveDaemon, tmp_path) -> None:
    # A second daemon on the first one's prepared model folder (a plain Hugging Face folder).
    model_dir = live_daemon.state_dir / "model"
    second = start_daemon(tmp_path / "a", extra_config=f'\n[model]\nbase = "{model_dir}"\n')
    family = _family(second.process.pid)
    assert len(family) >= 3, "expected the daemon, vLLM and its engine core"
    assert stop_daemon(second) == 0
    assert _wait_all_gone(family) == [], "SIGTERM left processes behind"
    assert not (second.state_dir / "daemon.json").exists()

    third = start_daemon(tmp_path / "b", extra_config=f'\n[model]\nbase = "{model_dir}"\n')
    family = _family(third.process.pid)
    third.process.send_signal(signal.SIGKILL)
    third.process.wait()
    assert _wait_all_gone(family[1:]) == [], "kill -9 of the daemon orphaned vLLM"
    # The next start finds the stale records and starts cleanly.
    fourth = start_daemon(tmp_path / "b")
    time.sleep(0.1)
    assert httpx.get(f"{fourth.url}/health").status_code == 200
    assert stop_daemon(fourth) == 0


def test_vllm_answers_no_one_but_cld(live_daemon: LiveDaemon) -> None:
    """Any local user can reach vLLM's loopback port: without the key it lists, loads and unloads nothing."""
    attempts = [("GET", "/v1/models", None),
                ("POST", "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "/tmp"}),
                ("POST", "/v1/unload_lora_adapter", {"lora_name": "cld-base"}),
                ("POST", "/v1/chat/completions", {"model": "cld-base", "messages": QUESTION, "max_tokens": 1})]
    for method, path, body in attempts:
        for headers in ({}, {"Authorization": "Bearer guess"}):
            reply = httpx.request(method, f"{live_daemon.vllm_url}{path}", json=body, headers=headers, timeout=30)
            assert reply.status_code == 401, (path, reply.text)
    key_file = live_daemon.state_dir / "vllm.key"
    assert key_file.stat().st_mode & 0o077 == 0, "the key file is for cld's user only"
    authorised = httpx.get(f"{live_daemon.vllm_url}/v1/models", timeout=30,
                           headers={"Authorization": f"Bearer {live_daemon.vllm_key}"})
    assert authorised.status_code == 200
    leader = int((live_daemon.state_dir / "vllm.pid").read_text().split()[0])
    for process in [psutil.Process(leader), *psutil.Process(leader).children(recursive=True)]:
        assert live_daemon.vllm_key not in " ".join(process.cmdline()), "other users can read a command line"

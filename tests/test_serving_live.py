"""The real daemon with the real vLLM server on the embedded model, through the `openai` client."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

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
    """vLLM listens on a UNIX socket in a folder only cld's user can enter, on no TCP port; even
    through the socket, without the key it lists, loads and unloads nothing."""
    attempts = [("GET", "/v1/models", None),
                ("POST", "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "/tmp"}),
                ("POST", "/v1/unload_lora_adapter", {"lora_name": "cld-base"}),
                ("POST", "/v1/chat/completions", {"model": "cld-base", "messages": QUESTION, "max_tokens": 1})]
    with live_daemon.vllm_client(key=False) as unkeyed:
        for method, path, body in attempts:
            for headers in ({}, {"Authorization": "Bearer guess"}):
                reply = unkeyed.request(method, path, json=body, headers=headers)
                assert reply.status_code == 401, (path, reply.text)
    key_file = live_daemon.state_dir / "vllm.key"
    assert key_file.stat().st_mode & 0o077 == 0, "the key file is for cld's user only"
    with live_daemon.vllm_client() as keyed:
        assert keyed.get("/v1/models").status_code == 200
    socket_path = Path(live_daemon.vllm_url.removeprefix("unix:"))
    assert stat.S_ISSOCK(socket_path.stat().st_mode) and socket_path.parent.stat().st_mode & 0o077 == 0
    leader = psutil.Process(int((live_daemon.state_dir / "vllm.pid").read_text().split()[0]))
    # the process serving HTTP on the socket listens on no TCP port (vLLM's engine worker keeps the
    # loopback ports of torch.distributed's gloo, which serve no HTTP route)
    tree = [leader, *leader.children(recursive=True)]
    [http_server] = [p for p in tree if any(c.laddr == str(socket_path) for c in p.net_connections("unix"))]
    assert not [c for c in http_server.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    if os.getuid() == 0:  # as another user (nobody): the folder refuses, whatever the key
        probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\nsys.exit(0)")
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        other = subprocess.run([python, "-c", probe, str(socket_path)], user=65534, group=65534, timeout=60)
        assert other.returncode != 0, "another local user reached vLLM's socket"  # 13: refused
    leader = int((live_daemon.state_dir / "vllm.pid").read_text().split()[0])
    for process in [psutil.Process(leader), *psutil.Process(leader).children(recursive=True)]:
        assert live_daemon.vllm_key not in " ".join(process.cmdline()), "other users can read a command line"

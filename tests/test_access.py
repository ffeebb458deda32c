"""Access control: the API key (from config, environment or a key file) guards /v1 and /api; a
public bind without a key never starts; vLLM only ever listens on loopback; request bodies over
the limit get 413 even when chunked; uploaded file names cannot leave the inbox."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from daemon.config import ConfigError, load_settings
from daemon.engine import vllm
from daemon.ingestion.journal import Input, Journal
from daemon.layout import StateDir
from daemon.learning.cycle import CannotServe
from daemon.service import Daemon
from tests.conftest import REPO, free_port

KEY = "s3cret-key-of-24-chars"
GUARDED = [
    ("GET", "/api/status", {}),
    ("GET", "/api/adapters", {}),
    ("POST", "/api/cycles", {}),
    ("POST", "/api/rollback", {"json": {"version": None}}),
    ("POST", "/api/documents/retry", {"json": {"documents": None}}),
    ("POST", "/api/documents", {"files": {"file": ("a.txt", b"a")}}),
    ("GET", "/v1/models", {}),
    ("POST", "/v1/chat/completions", {"json": {"model": "cld", "messages": [{"role": "user", "content": "hi"}]}}),
    ("POST", "/v1/completions", {"json": {"model": "cld", "prompt": "hi"}}),
]


def write_config(tmp_path: Path, text: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "state"\n[serve]\nport = {free_port()}\nvllm_port = {free_port()}\n{text}')
    return config


def front_of(config: Path) -> httpx.AsyncClient:
    """The daemon's real front app (as `cld run` builds it from the settings), without vLLM."""
    settings = load_settings(config)
    app = Daemon(settings, StateDir(settings.state.dir).ensure())._app()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front")


def key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "api.key"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture(params=["config", "environment", "key file"])
def keyed_config(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if request.param == "config":
        return write_config(tmp_path, f'[security]\napi_key = "{KEY}"\n')
    if request.param == "environment":
        monkeypatch.setenv("CLD_SECURITY__API_KEY", KEY)
        return write_config(tmp_path)
    key_file(tmp_path, f"  {KEY}\n")
    return write_config(tmp_path, '[security]\napi_key_file = "api.key"\n')


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"bearer  {KEY}"])
async def test_calls_without_the_right_key_get_401(keyed_config: Path, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    async with front_of(keyed_config) as front:
        for method, path, args in GUARDED:
            reply = await front.request(method, path, headers=headers, **args)
            assert reply.status_code == 401, (method, path, reply.text)
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert reply.headers["www-authenticate"] == "Bearer"
    inbox = keyed_config.parent / "state" / "inbox"
    assert not inbox.exists() or not any(inbox.iterdir()), "a refused upload leaves nothing"


async def test_the_right_key_gets_through(keyed_config: Path) -> None:
    async with front_of(keyed_config) as front:
        authorised = {"Authorization": f"Bearer {KEY}"}
        assert (await front.get("/api/status", headers=authorised)).status_code == 200
        assert (await front.get("/api/adapters", headers=authorised)).status_code == 200
        assert [m["id"] for m in (await front.get("/v1/models", headers=authorised)).json()["data"]] == \
            ["cld", "cld-base"]
        upload = await front.post("/api/documents", headers=authorised, files={"file": ("a.txt", b"a")})
        assert upload.status_code == 202
        assert (await front.get("/health")).status_code == 503, "/health needs no key (and vLLM is not up)"


ADMIN = "an-admin-key-only-operators-hold"
ADMIN_ACTIONS = [(method, path, args) for method, path, args in GUARDED if method == "POST" and path.startswith("/api")]


async def test_with_an_admin_key_inference_keys_cannot_change_what_is_served(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[security]\napi_key = "{KEY}"\nadmin_key = "{ADMIN}"\n')
    async with front_of(config) as front:
        for method, path, args in ADMIN_ACTIONS:
            reply = await front.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, **args)
            assert reply.status_code == 401, (path, reply.text)
            reply = await front.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"}, **args)
            assert reply.status_code in (200, 202, 503), (path, reply.text)  # 503: vLLM is not up here
        assert (await front.get("/api/status", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200


async def test_set_aside_documents_are_put_back_by_the_admin_api(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    async with front_of(config) as front:
        book = Journal(tmp_path / "state" / "journal.sqlite3")
        try:
            ids = [book.accept(Input(f"{n}.txt", 1, 1), f"processed/{n}.txt", n, [{"text": n}]).document_id
                   for n in ("a", "b", "c")]
            for doc in ids:
                book.set_chunks(doc, [(1, {"text": "x"})])
            book.refused(ids[:2], "cycle 1 refused its candidate", max_attempts=1)
            reply = await front.post("/api/documents/retry", json={"documents": [ids[1], ids[2]]})
            assert reply.status_code == 200 and reply.json() == {"retried": [{"id": ids[1], "source": "b.txt"}]}
            assert [d["id"] for d in book.documents("ready")] == ids[1:], "only set-aside ones are put back"
            reply = await front.post("/api/documents/retry", json={})
            assert [d["id"] for d in reply.json()["retried"]] == [ids[0]]
        finally:
            book.close()


@pytest.mark.parametrize("version", ["/etc", "../../tmp/x", "v0001/../../x", "v1", "V0001", "base/.."])
async def test_rollback_takes_version_names_only(tmp_path: Path, version: str) -> None:
    async with front_of(write_config(tmp_path)) as front:
        reply = await front.post("/api/rollback", json={"version": version})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_version", reply.text
    assert not (tmp_path / "state" / "serving.json").exists()


async def test_a_version_that_cannot_be_served_is_503_with_the_reason(tmp_path: Path) -> None:
    """It was 500 "cld failed: RuntimeError" (vLLM refusing an adapter, an instance that did not start)."""
    settings = load_settings(write_config(tmp_path))
    daemon = Daemon(settings, StateDir(settings.state.dir).ensure())

    async def rollback(version: str | None) -> None:
        raise CannotServe(f"{version} could not be served, v0002 still serves: its instance exited")

    daemon.learner = SimpleNamespace(rollback=rollback)  # type: ignore[assignment]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=daemon._app()), base_url="http://front") as front:
        reply = await front.post("/api/rollback", json={"version": "v0001"})
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["message"] == "v0001 could not be served, v0002 still serves: its instance exited"


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"])
async def test_the_api_is_not_described_to_anyone(keyed_config: Path, path: str) -> None:
    async with front_of(keyed_config) as front:
        assert (await front.get(path)).status_code == 404
        assert (await front.get(path, headers={"Authorization": f"Bearer {KEY}"})).status_code == 404


def test_a_key_file_is_stripped_and_resolved_next_to_the_config(tmp_path: Path) -> None:
    key_file(tmp_path, f"\n {KEY} \n\n", mode=0o640)
    settings = load_settings(write_config(tmp_path, '[security]\napi_key_file = "api.key"\n'))
    assert settings.security.api_key == KEY and settings.security.api_key_file == tmp_path / "api.key"


@pytest.mark.parametrize("contents, mode, words", [
    (KEY, 0o644, r"security.api_key_file .*api.key is accessible to other users \(mode 644\): chmod 600 it"),
    (KEY, 0o606, r"accessible to other users \(mode 606\)"),
    (" \n\t\n", 0o600, r"security.api_key_file .*api.key is empty"),
    (None, 0o600, r"security.api_key_file .*api.key cannot be read: .*No such file"),
])
def test_an_unsafe_or_unusable_key_file_refuses_to_start(tmp_path: Path, contents: str | None, mode: int,
                                                         words: str) -> None:
    if contents is not None:
        key_file(tmp_path, contents, mode)
    with pytest.raises(ConfigError, match=words):
        load_settings(write_config(tmp_path, '[security]\napi_key_file = "api.key"\n'))


def test_a_key_and_a_key_file_together_are_refused(tmp_path: Path) -> None:
    key_file(tmp_path, KEY)
    with pytest.raises(ConfigError, match="security.api_key and security.api_key_file are both set"):
        load_settings(write_config(tmp_path, f'[security]\napi_key = "{KEY}"\napi_key_file = "api.key"\n'))


def test_a_public_bind_with_a_key_file_is_allowed(tmp_path: Path) -> None:
    key_file(tmp_path, KEY)
    config = tmp_path / "config.toml"
    config.write_text(f'[serve]\nhost = "0.0.0.0"\nport = {free_port()}\n[security]\napi_key_file = "api.key"\n')
    settings = load_settings(config)
    assert not settings.serve.is_loopback and settings.security.api_key == KEY


def test_cld_run_on_a_public_address_without_a_key_exits_before_anything_starts(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "state"\n[serve]\nhost = "0.0.0.0"\nport = {free_port()}\n')
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode != 0
    assert "serve.host = '0.0.0.0' is reachable from other machines: set security.api_key" in done.stderr
    assert not (tmp_path / "state").exists(), "nothing may start (not even the state directory)"


# ---- vLLM listens on loopback only -----------------------------------------------------------------

@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--port", "80"], ["--uds", "/tmp/v"],
                                  ["--enforce-eager", "--port=80"], ["--ho=0.0.0.0"], ["--hos", "0.0.0.0"],
                                  ["--por=80"], ["--ud", "/tmp/v"], ["--api-key", "mine"], ["--api-k=mine"],
                                  ["--api_key", "x"], ["--api_k=x"], ["--config", "x.yaml"], ["--config=x.yaml"],
                                  ["--served_model_name", "x"], ["--max-model-len=99"], ["--model", "other"],
                                  ["--chat-template", "t.jinja"], ["--chat_template=t.jinja"]])
def test_vllm_args_that_set_what_cld_sets_are_refused(tmp_path: Path, args: list[str]) -> None:
    with pytest.raises(ConfigError,
                       match=r"serve.vllm_args: serve.vllm_args may not set --(ho|po|ud|api|con|ser|max|mod|chat)"):
        load_settings(write_config(tmp_path, f"vllm_args = {args!r}\n".replace("'", '"')))


def test_abbreviations_are_named_with_the_option_they_mean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"may not set --ho=0.0.0.0 \(--host\) \(--host: vLLM listens only on its socket"):
        load_settings(write_config(tmp_path, 'vllm_args = ["--ho=0.0.0.0"]\n'))
    with pytest.raises(ConfigError, match=r"may not set --api_k=x \(--api-key\)"):
        load_settings(write_config(tmp_path, 'vllm_args = ["--api_k=x"]\n'))
    assert load_settings(write_config(tmp_path, 'vllm_args = ["--enforce-eager", "--max-num-seqs=8"]\n'))
    # a neighbour of a reserved option is not it
    assert load_settings(write_config(tmp_path, 'vllm_args = ["--chat-template-content-format=openai"]\n'))


@pytest.mark.parametrize("args, problem", [
    (["--enforce-eager", "--max-num-seqs=8"], None),
    (["--api_key", "x"], "may not set --api-key"),
    (["--enforce-eager", "--api-k=x"], "may not set --api-key"),
    (["--config", "YAML"], "may not set --config"),
    (["--config=YAML"], "may not set --config"),
    (["somewhere/else"], "may not set --model"),  # vLLM's positional model
    (["--served_model_name", "cld"], "may not set --served-model-name"),
    (["--no-such-option"], "vLLM refuses serve.vllm_args: .*unrecognized arguments: --no-such-option"),
])
def test_vllm_args_are_read_by_vllms_own_parser(tmp_path: Path, args: list[str], problem: str | None) -> None:
    """The daemon asks vLLM's own parser before vLLM starts: a config file whose YAML sets the key or a
    socket, underscores, a positional model — whatever form the parser takes — and its own errors."""
    pytest.importorskip("vllm")
    yaml = tmp_path / "vllm.yaml"
    yaml.write_text("api-key: sekrit\nuds: /tmp/vllm.sock\n")
    found = vllm.reserved_settings([arg.replace("YAML", str(yaml)) for arg in args])
    assert found is None if problem is None else re.search(problem, found or ""), found


def test_the_daemon_checks_vllm_args_in_a_process_of_its_own() -> None:
    pytest.importorskip("vllm")
    assert asyncio.run(vllm.check_args([])) is None  # nothing to ask: no process
    assert "may not set --api-key" in asyncio.run(vllm.check_args(["--enforce-eager", "--api_key=x"]))


def test_vllm_listens_only_on_a_socket_in_a_folder_of_cld_s_user(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'host = "0.0.0.0"\nvllm_args = ["--enforce-eager"]\n'
                                    f'[security]\napi_key = "{KEY}"\n')
    settings = load_settings(config)
    daemon = Daemon(settings, StateDir(settings.state.dir).ensure())
    assert daemon.vllm_socket == (tmp_path / "state" / "run" / "vllm.sock").resolve()
    assert daemon.vllm_socket.parent.stat().st_mode & 0o777 == 0o700
    argv = vllm.server_command(tmp_path, settings, daemon.vllm_socket)
    assert argv[argv.index("--uds") + 1] == str(daemon.vllm_socket) and argv.count("--uds") == 1
    assert "--host" not in argv and "--port" not in argv
    assert argv[-1] == "--enforce-eager"


def test_a_state_directory_too_deep_for_a_socket_gets_a_private_folder(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    folder = vllm.sockets_dir(deep)
    assert len(str(folder / "vllm-2.sock")) <= vllm.MAX_SOCKET_PATH and folder.stat().st_uid == os.getuid()
    assert folder.stat().st_mode & 0o777 == 0o700 and vllm.sockets_dir(deep) == folder, "the same each start"
    folder.chmod(0o755)  # loosened by someone: tightened again
    assert vllm.sockets_dir(deep) == folder and folder.stat().st_mode & 0o777 == 0o700
    folder.rmdir()


# ---- request size limits -------------------------------------------------------------------------------

async def chunks(size_bytes: int, chunk_bytes: int = 4096) -> AsyncIterator[bytes]:
    """A body sent with Transfer-Encoding: chunked (no Content-Length): the server cannot know its size."""
    sent = 0
    while sent < size_bytes:
        yield b" " * min(chunk_bytes, size_bytes - sent)
        sent += chunk_bytes


def json_chunks(size_bytes: int) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "cld", "prompt": "hi"'
        async for block in chunks(size_bytes):
            yield block
        yield b"}"
    return body()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/api/rollback"])
async def test_bodies_over_the_limit_get_413_even_chunked(tmp_path: Path, path: str) -> None:
    config = write_config(tmp_path, "max_request_mb = 0.01\n")  # 10 kB
    async with front_of(config) as front:
        chunked = await front.post(path, content=json_chunks(20_000), headers={"content-type": "application/json"})
        announced = await front.post(path, content=b"{" + b" " * 20_000 + b"}",
                                     headers={"content-type": "application/json"})
    for reply in (chunked, announced):
        assert reply.status_code == 413, reply.text
        assert reply.json()["error"]["message"] == "request body over 0.01 MB (serve.max_request_mb)"


async def test_a_chunked_body_under_the_limit_is_read_whole(tmp_path: Path) -> None:
    config = write_config(tmp_path, "max_request_mb = 0.01\n")
    async with front_of(config) as front:
        reply = await front.post("/v1/completions", content=json_chunks(9_000),
                                 headers={"content-type": "application/json"})
    # Read and parsed whole, then forwarded: vLLM is not running here, so the proxy answers 503.
    assert reply.status_code == 503 and "the model server is starting" in reply.text


async def test_a_chunked_upload_over_the_limit_gets_413_and_leaves_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[ingest]\nmax_file_mb = 0.01\n")
    boundary = "cldboundary"

    async def upload() -> AsyncIterator[bytes]:
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
               "Content-Type: text/plain\r\n\r\n").encode()
        async for block in chunks(200_000):
            yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    async with front_of(config) as front:
        reply = await front.post("/api/documents", content=upload(),
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert reply.status_code == 413
    assert reply.json()["error"]["message"] == "over the upload limit of 0.01 MB (ingest.max_file_mb)"
    assert list((tmp_path / "state" / "inbox").iterdir()) == []


# ---- upload file names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("hostile, stored", [
    ("../../etc/cron.d/evil.txt", "evil.txt"),
    ("..\\..\\Windows\\evil.md", "evil.md"),
    ("/var/lib/cld/journal.sqlite3.md", "journal.sqlite3.md"),
    (".bashrc.md", "bashrc.md"),
    ("....hidden.txt", "hidden.txt"),
    ("a\x1b[31mred\x07.txt", "a_[31mred_.txt"),
    ("gpj\u202e.md", "gpj_.md"),  # a right-to-left override would show this name reversed
    ("zero\u200bwidth.md", "zero_width.md"),
    ("é" * 150 + ".md", "é" * 98 + ".md"),  # 200 bytes at most, suffix kept
    ("x" * 300 + ".md", "x" * 197 + ".md"),
])
async def test_hostile_upload_names_become_plain_names_inside_the_inbox(tmp_path: Path, hostile: str,
                                                                        stored: str) -> None:
    async with front_of(write_config(tmp_path)) as front:
        reply = await front.post("/api/documents", content=multipart(hostile, b"text"),
                                 headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert reply.status_code == 202, reply.text
    inbox = tmp_path / "state" / "inbox"
    assert reply.json()["name"] == stored
    assert [p.name for p in inbox.iterdir()] == [stored] and (inbox / stored).read_bytes() == b"text"
    assert len(stored.encode()) <= 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "state"], "nothing lands outside"


@pytest.mark.parametrize("hostile, status", [
    ("..", 400), ("../", 400), (" . ", 400),
    ("\x00\x01", 415), ("/etc/passwd", 415),  # a name is left, but not of a document type
])
async def test_upload_names_with_nothing_usable_are_refused(tmp_path: Path, hostile: str, status: int) -> None:
    async with front_of(write_config(tmp_path)) as front:
        reply = await front.post("/api/documents", content=multipart(hostile, b"text"),
                                 headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert reply.status_code == status
    assert list((tmp_path / "state" / "inbox").iterdir()) == []


BOUNDARY = "cld-test-boundary"


def multipart(filename: str, data: bytes) -> bytes:
    """A one-file form with `filename` exactly as given (clients' encoders would tidy it up first)."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()

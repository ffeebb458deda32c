"""Slow clients cannot hold the front's connections: headers must arrive within
serve.client_timeout_s (the connection is closed), and a body may not stall longer (408). Runs
the real uvicorn server with cld's protocol on a loopback port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn

from daemon.config import load_settings
from daemon.front import slowclients
from daemon.layout import StateDir
from daemon.service import Daemon, FrontServer
from tests.conftest import free_port

TIMEOUT_S = 0.5


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[int]:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "state"\n[serve]\nport = {port}\n'
                      f"client_timeout_s = {TIMEOUT_S}\nmin_body_kb_s = 0.1\n")  # 100 bytes a second
    settings = load_settings(config)
    daemon = Daemon(settings, StateDir(settings.state.dir).ensure())
    daemon.phase = "serving"  # ready as far as the front knows (no vLLM here: /health says 503)
    app = daemon._app()
    server = FrontServer(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                        http=slowclients.protocol(TIMEOUT_S)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    yield port
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection (TimeoutError if it did not)."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_idle_and_trickling_connections_are_closed(front: int) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", front) for _ in range(10)]
    reader, writer = await asyncio.open_connection("127.0.0.1", front)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        for _ in range(40):  # a header byte every 0.1 s: 4 s, if nothing stopped it
            await asyncio.sleep(0.1)
            if writer.is_closing():
                return
            writer.write(b"X")
            try:
                await writer.drain()
            except ConnectionError:
                return

    trickling = asyncio.create_task(trickle())
    for idle_reader, _ in idle:
        assert await closed_within(idle_reader, 3) == b""
    assert await closed_within(reader, 3) == b"", "a trickled header must not keep the connection"
    trickling.cancel()
    for _, each in [*idle, (reader, writer)]:
        each.close()


async def test_a_stalled_body_gets_408(front: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", front)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\":")
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert answer.startswith(b"HTTP/1.1 408")
    writer.close()
    await asyncio.sleep(0)


async def test_a_body_trickled_under_the_stall_limit_gets_408_by_its_total_deadline(front: int) -> None:
    """A byte every 0.3 s never stalls 0.5 s (serve.client_timeout_s), so it held the connection for
    as long as the client liked; it must keep 100 bytes a second on average (serve.min_body_kb_s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", front)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{")
    await writer.drain()

    async def trickle() -> None:
        for _ in range(60):  # 18 s, if nothing stopped it
            await asyncio.sleep(0.3)
            writer.write(b" ")
            await writer.drain()

    trickling = asyncio.create_task(trickle())
    started = asyncio.get_running_loop().time()
    answer = await asyncio.wait_for(reader.read(4096), 5)
    assert answer.startswith(b"HTTP/1.1 408") and b"too slowly" in answer and b"serve.min_body_kb_s" in answer
    assert asyncio.get_running_loop().time() - started < 2
    trickling.cancel()
    writer.close()
    await asyncio.sleep(0)


async def test_a_prompt_client_is_served(front: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", front)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert answer.startswith(b"HTTP/1.1 503"), answer  # served (vLLM is not up here)
    writer.close()

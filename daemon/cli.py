"""The `cld` command line. Entry point: `cld --help`.

Owns argument parsing and what the user sees; every command calls into the daemon's modules
(or the running daemon's HTTP API) and holds no logic of its own.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from daemon.config import ConfigError, Settings, load_settings, reference_markdown

app = typer.Typer(
    name="cld",
    help="cld: serve an LLM through vLLM and keep teaching it new documents without forgetting.\n\n"
    "Start with `cld run`; then ask with `cld query`, look with `cld status`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", envvar="CLD_CONFIG", help="Config file (default: ./config.toml if present).",
                 show_default=False),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as error:
        _fail(str(error))


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"cld: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _setup_logging() -> None:
    level = os.environ.get("CLD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the daemon: serve the model on the OpenAI API and learn. This is what systemd runs."""
    from daemon import model, service

    settings = _settings(config)
    _setup_logging()
    try:
        service.run(settings)
    except (service.StartupError, model.ModelError) as error:
        _fail(str(error), code=1)


@app.command()
def prepare(config: ConfigOption = None) -> None:
    """Make the base model ready (converts the embedded GGUF once; `run` does it when needed)."""
    from daemon import model
    from daemon.layout import StateDir

    settings = _settings(config)
    _setup_logging()
    try:
        path = model.prepare(settings.model.base, StateDir(settings.state.dir))
    except model.ModelError as error:
        _fail(str(error), code=1)
    typer.echo(f"base model ready: {path}")


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the same JSON as GET /api/status.")] = False,
) -> None:
    """Show what the daemon serves and knows. Works whether or not the daemon runs."""
    from daemon import status as status_mod
    from daemon.layout import StateDir

    settings = _settings(config)
    record = status_mod.running_daemon(StateDir(settings.state.dir))
    result = _live_status(record, settings) if record else None
    if result is None:
        result = status_mod.collect(settings)
    typer.echo(json.dumps(result, indent=2) if as_json else status_mod.render(result))


def _live_status(record: dict, settings: Settings) -> dict | None:
    import httpx

    headers = {"Authorization": f"Bearer {settings.security.api_key}"} if settings.security.api_key else {}
    try:
        reply = httpx.get(f"{record['url']}/api/status", headers=headers, timeout=5)
        reply.raise_for_status()
        return reply.json()
    except httpx.HTTPError:
        return None


@app.command()
def query(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    config: ConfigOption = None,
    base: Annotated[bool, typer.Option("--base", help="Ask the base model instead of the learned one.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = always the most likely answer.")] = 0.0,
) -> None:
    """Ask the served model a question (a chat message) and stream its answer."""
    import openai

    settings = _settings(config)
    serve = settings.serve
    host = "127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host
    client = openai.OpenAI(base_url=f"http://{host}:{serve.port}/v1", api_key=settings.security.api_key or "none",
                           max_retries=0, timeout=serve.request_timeout_s)
    name = serve.base_name if base else serve.model_name
    try:
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=temperature, stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                typer.echo(chunk.choices[0].delta.content, nl=False)
    except openai.APIConnectionError:
        _fail(f"no daemon answers at {client.base_url}: start it with `cld run`", code=1)
    except openai.APIStatusError as error:
        _fail(f"the daemon refused: {error.message}", code=1)
    typer.echo()


@app.command("config")
def config_cmd(
    config: ConfigOption = None,
    reference: Annotated[bool, typer.Option("--reference", help="Print the reference table of all keys.")] = False,
) -> None:
    """Check the configuration and print the effective settings (secrets hidden)."""
    if reference:
        typer.echo(reference_markdown())
        return
    settings = _settings(config)
    data = settings.model_dump(mode="json")
    if data["security"]["api_key"]:
        data["security"]["api_key"] = "***"
    typer.echo(json.dumps(data, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The `cld` command line. Entry point: `cld --help`.

Owns argument parsing and what the user sees; every command calls into the daemon's modules
(or the running daemon's HTTP API) and holds no logic of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from daemon.config import ConfigError, Settings, load_settings, reference_markdown
from daemon.layout import StateDir

# Each command imports what it needs itself (deliberately lazy): `cld status` or `cld ingest` must
# not pay for torch, vLLM's client or the daemon's server stack.
if TYPE_CHECKING:
    from daemon.ingestion.submit import Outcome

app = typer.Typer(
    name="cld",
    help="cld: serve an LLM through vLLM and keep teaching it new documents without forgetting.\n\n"
    "Start with `cld run`; then ask with `cld query`, look with `cld status`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", envvar="CLD_CONFIG", help="Config file (default: ./config.toml if present).",
                 show_default=False),
]


SECRETS = (("security", "api_key"), ("security", "admin_key"), ("serve", "vllm_api_key"),  # never printed
           ("augment", "teacher_api_key"))
PIPED_WIDTH = 200  # columns of `cld status` when its output is not a terminal


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as error:
        _fail(str(error))


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"cld: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _setup_logging(settings: Settings) -> None:
    from daemon import logs

    logs.setup(settings.log)


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the daemon: serve the model on the OpenAI API and learn. This is what systemd runs."""
    from daemon import model, service

    settings = _settings(config)
    _setup_logging(settings)
    try:
        service.run(settings)
    except (service.StartupError, model.ModelError) as error:
        _fail(str(error), code=1)


@app.command()
def prepare(config: ConfigOption = None) -> None:
    """Make the base model and the replay buffer ready (`run` does both when they are missing).

    The base model is converted once (the embedded GGUF) or checked (a Hugging Face folder). The
    replay buffer is built from replay.corpus, or, for the embedded model, from the replay text it
    wrote once (shipped); otherwise the base model writes one, which needs the model server, so
    `cld run` builds it in the background instead.
    """
    from daemon import model

    settings = _settings(config)
    _setup_logging(settings)
    try:
        path = model.prepare(settings.model.base, StateDir(settings.state.dir))
    except model.ModelError as error:
        _fail(str(error), code=1)
    typer.echo(f"base model ready: {path}")
    from daemon.learning import replay_plan
    from replay import seed

    if not settings.replay.corpus and not seed.matches(replay_plan.build_job(settings, None)):
        typer.echo("replay.corpus is empty: `cld run` has the base model write the replay corpus once it serves")
        return
    replay_build(config)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the same JSON as GET /api/status.")] = False,
) -> None:
    """Show what the daemon serves and knows. Works whether or not the daemon runs."""
    from daemon.observe import status as status_mod

    settings = _settings(config)
    record = status_mod.running_daemon(StateDir(settings.state.dir))
    result = _live_status(record, settings) if record else None
    if result is None:
        result = status_mod.collect(settings)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped: whole lines, for grep
        console.width = PIPED_WIDTH
    console.print(status_mod.render(result))


def _live_status(record: dict, settings: Settings) -> dict | None:
    import httpx

    headers = _auth_headers(settings)
    try:
        reply = httpx.get(f"{record['url']}/api/status", headers=headers, timeout=5)
        reply.raise_for_status()
        return reply.json()
    except httpx.HTTPError:
        return None


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files, or folders of files, to learn.", show_default=False)],
    config: ConfigOption = None,
    wait_s: Annotated[float, typer.Option("--wait-s", help="How long to wait for a running daemon to take them.")] = 60,
) -> None:
    """Hand documents in: they are copied into the inbox, like files dropped there.

    No daemon running: they are ingested here and now. Else the daemon takes them and this waits.

    Prints what became of each; exit code 1 if any was refused, quarantined or not taken yet.
    """
    from daemon.ingestion.inbox import HandInError
    from daemon.ingestion.submit import ingest_paths

    settings = _settings(config)
    try:
        outcomes = ingest_paths(settings, paths, wait_s)
    except HandInError as error:
        _fail(str(error))
    except OSError as error:  # the disk is full, the state directory is not writable, ...
        _fail(f"nothing more was taken in: {error.strerror or error}", code=1)
    for outcome in outcomes:
        typer.echo(f"{outcome.source}: {_describe(outcome, settings.state.dir)}")
    if any(o.recorded is None or o.recorded.outcome == "quarantined" for o in outcomes):
        raise typer.Exit(1)


def _describe(outcome: Outcome, state_dir: Path) -> str:
    recorded = outcome.recorded
    if outcome.refused:
        return f"refused: {outcome.refused}"
    if recorded is None:
        return f"queued as {outcome.name}; not taken yet (see `cld status`)"
    if recorded.outcome == "quarantined":
        return f"quarantined: {recorded.reason} (see {state_dir / recorded.stored_as}.reason)"
    if recorded.outcome == "duplicate":
        return "already known: same text as an earlier document"
    return f"ingested as a new document (kept in {state_dir / recorded.stored_as})"


@app.command()
def query(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    config: ConfigOption = None,
    base: Annotated[bool, typer.Option("--base", help="Ask the base model instead of the learned one.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = always the most likely answer.")] = 0.0,
    recall: Annotated[bool, typer.Option("--recall/--no-recall", help="Let the daemon put passages of the documents "
                                         "it holds in front of the question (--no-recall: the weights alone).")] = True,
) -> None:
    """Ask the served model a question (a chat message), stream its answer and name the documents
    it was given (recall)."""
    import openai

    from daemon.recall.frame import HEADER as SOURCES_HEADER

    settings = _settings(config)
    serve = settings.serve
    host = "127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host
    client = openai.OpenAI(base_url=f"http://{host}:{serve.port}/v1", api_key=settings.security.api_key or "none",
                           max_retries=0, timeout=serve.request_timeout_s)
    name = serve.base_name if base else serve.model_name
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=temperature, stream=True, extra_body={"recall": recall},
        )
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                typer.echo(chunk.choices[0].delta.content, nl=False)
        sources = raw.headers.get(SOURCES_HEADER)
    except openai.APIConnectionError:
        _fail(f"no daemon answers at {client.base_url}: start it with `cld run`", code=1)
    except openai.APIStatusError as error:
        _fail(f"the daemon refused: {error.message}", code=1)
    typer.echo()
    if sources:
        typer.echo(f"sources: {', '.join(source_names(sources))}")


def source_names(header: str) -> list[str]:
    """"notes.md#2; a%20b.txt#1" (the X-CLD-Sources header) as ["notes.md (part 2)", "a b.txt (part 1)"]."""
    from urllib.parse import unquote

    named = []
    for item in header.split("; "):
        name, _, part = item.rpartition("#")
        named.append(f"{unquote(name)} (part {part})")
    return named


@app.command()
def cycle(
    config: ConfigOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the cycle ends and print its outcome.")] = False,
) -> None:
    """Run a learning cycle now: train on the new documents, probe, promote only if it passes."""
    settings = _settings(config)
    reply = _daemon_api(settings, "POST", "/api/cycles")
    import time

    from daemon.observe import status as status_mod

    started = reply["cycle"]
    if started is None:
        _fail("no cycle could start (see `cld status`)", code=1)
    if started["state"] != "running":  # ended at once: skipped (and why), or failed
        typer.echo(f"cycle {started['id']} {status_mod.cycle_line(started)}")
        raise typer.Exit(0 if started["state"] in ("promoted", "rejected", "skipped") else 1)
    verb = "started" if reply["started"] else "already running"
    typer.echo(f"cycle {started['id']} {verb}")
    if not wait:
        return

    from rich.console import Console

    console, began, stage = Console(stderr=True), time.monotonic(), None
    with console.status(f"cycle {started['id']} running") as shown:  # a live line on a terminal, nothing else
        while True:
            time.sleep(2)
            cycles = _daemon_api(settings, "GET", "/api/status")["cycles"]
            found = next((c for c in cycles if c["id"] == started["id"]), None)
            if found and found["state"] != "running":
                break
            if found:
                shown.update(f"cycle {found['id']} {status_mod.cycle_line(found)} ({status_mod.span(time.monotonic() - began)})")
                if not console.is_terminal and found["stage"] != stage:  # a log gets one line per stage
                    typer.echo(f"cycle {found['id']} {found['stage']}", err=True)
                stage = found["stage"]
    typer.echo(f"cycle {found['id']} {status_mod.cycle_line(found)}")
    raise typer.Exit(0 if found["state"] in ("promoted", "rejected", "skipped") else 1)


@app.command("adapters")
def adapters_cmd(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (as GET /api/adapters).")] = False,
) -> None:
    """List adapter versions: lineage, probe results and state. Works with the daemon stopped."""
    from daemon.observe import status as status_mod

    found = status_mod.adapters(_settings(config))
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        typer.echo("no adapter versions yet")
    for a in found:
        typer.echo(adapter_line(a))
        for line in refusal_lines(a):
            typer.echo(f"    {line}")


def adapter_line(a: dict[str, Any]) -> str:
    """One version in `cld adapters`: state, lineage, what it learned from, what its probes measured."""
    probes = a["probes"] or {}
    cloze = probes.get("cloze_pass")
    forgetting = probes.get("forgetting_vs_base")
    measured = (f"cloze {cloze:.0%}" if cloze is not None else "cloze -") + answering(probes) + (
        f", forgetting {forgetting:+.1%}" if forgetting is not None else "")
    augmented = (a.get("records") or {}).get("augmented")
    taught = [d["teacher"] for d in (a.get("augmentation") or {}).values() if d.get("teacher")]
    made = f" (+{augmented} augmented records" if augmented else ""
    if made and taught:
        made += f"; teacher kept {sum(t['kept'] for t in taught)} of {sum(t['asked'] or 0 for t in taught)} asked"
        if rephrased := [t["rephrasings"] for t in taught if t.get("rephrasings")]:
            made += f", {sum(r['kept'] for r in rephrased)} of {sum(r['asked'] for r in rephrased)} rephrasings"
    pruned = f"  (weights deleted {a['pruned_at']}: state.keep_merged)" if a.get("pruned_at") else ""
    relearned = f" + {a['relearned']} learned again" if a.get("relearned") else ""
    return (f"{a['version']}  {a['state']:<9} parent {a['parent'] or 'base':<6} "
            f"{a['documents']} docs{relearned}{made + ')' if made else ''}  {measured}{pruned}")


def answering(probes: dict[str, Any]) -> str:
    """The held-out questions a version answers closed book, beside what the base answers open book."""
    closed, opened, items = probes.get("closed_book"), probes.get("open_book"), probes.get("question_items")
    if closed is None or not items:
        return ""
    shown = f", answered {round(closed * items)}/{items} closed book"
    return shown + (f" (base open book {round(opened * items)}/{items})" if opened is not None else "")


def refusal_lines(a: dict[str, Any], shown_lost: int = 5) -> list[str]:
    """Why a version was refused: each failed check (value, limit, items), then the earlier facts
    the serving version completed and this one did not."""
    if a["state"] != "rejected":
        return []
    lines = [f"refused: {failure['reason']}" for failure in a.get("failed") or []]
    lost = a.get("lost") or []
    lines += [f"lost: {item['prompt']!r} -> expected {item['expected']!r}, got {item['got']!r}"
              for item in lost[:shown_lost]]
    if len(lost) > shown_lost:
        lines.append(f"lost: {len(lost) - shown_lost} more (`cld adapters --json`)")
    return lines


@app.command()
def rollback(
    version: Annotated[Optional[str], typer.Argument(help="Version to serve (e.g. v0002) or 'base'. "
                                                     "Default: the previous promoted version.")] = None,
    config: ConfigOption = None,
) -> None:
    """Serve an earlier adapter version (or the base model) under the stable name again."""
    from daemon.observe import status as status_mod

    settings = _settings(config)
    if version is None:
        history = [a["version"] for a in status_mod.adapters(settings)
                   if a["state"] in ("promoted", "retired") and not a.get("pruned_at")]
        version = history[-2] if len(history) >= 2 else "base"
    from daemon.engine.merged import is_merged

    wait_s = 60.0
    if version != "base" and is_merged(StateDir(settings.state.dir).adapters / version):
        wait_s += settings.serve.startup_timeout_s
        typer.echo(f"{version} holds merged weights: starting a vLLM instance for it (a minute or more on a CPU)")
    reply = _daemon_api(settings, "POST", "/api/rollback", {"version": version}, timeout_s=wait_s)
    typer.echo(f"{settings.serve.model_name} now serves {reply['serving'] or 'the base model'}")


@app.command()
def retry(
    documents: Annotated[Optional[list[int]], typer.Argument(help="Ids of set-aside documents (default: all).")] = None,
    config: ConfigOption = None,
    list_only: Annotated[bool, typer.Option("--list", help="Only list the set-aside documents and why.")] = False,
) -> None:
    """Put documents set aside after refused cycles (schedule.max_attempts) back into the next cycle."""
    from daemon.ingestion import journal

    settings = _settings(config)
    if list_only:
        aside = journal.set_aside(StateDir(settings.state.dir).journal)
        for doc in aside:
            typer.echo(f"{doc['id']}  {doc['source']}  refused in {doc['attempts']} cycles; last: {doc['why']}")
        if not aside:
            typer.echo("no documents are set aside")
        return
    retried = _daemon_api(settings, "POST", "/api/documents/retry", {"documents": documents})["retried"]
    for doc in retried:
        typer.echo(f"{doc['id']}  {doc['source']}  back in the next cycle")
    if not retried:
        typer.echo("no set-aside documents to retry" + (" with those ids" if documents else ""))


def _auth_headers(settings: Settings, admin: bool = False) -> dict[str, str]:
    key = (settings.security.admin_key if admin else "") or settings.security.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def _daemon_api(settings: Settings, method: str, path: str, body: dict | None = None, timeout_s: float = 60) -> dict:
    """Call the running daemon's admin API; exit with a clear message when it cannot."""
    import httpx

    from daemon.observe import status as status_mod

    record = status_mod.running_daemon(StateDir(settings.state.dir))
    if record is None:
        _fail("the daemon is not running: start it with `cld run`", code=1)
    headers = _auth_headers(settings, admin=method != "GET")
    try:
        reply = httpx.request(method, f"{record['url']}{path}", json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as error:
        _fail(f"the daemon did not answer at {record['url']}: {error}", code=1)
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text
        _fail(f"the daemon refused: {message}", code=1)
    return reply.json()


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
    for section, key in SECRETS:
        if data[section][key]:
            data[section][key] = "***"
    typer.echo(json.dumps(data, indent=2))


# ---- cld replay ... ------------------------------------------------------------------------

replay_app = typer.Typer(help="The replay buffer: the base model's own text that is mixed into training.",
                         no_args_is_help=True)
app.add_typer(replay_app, name="replay")


@replay_app.command("build")
def replay_build(config: ConfigOption = None) -> None:
    """Build or update the replay buffer now (resumable; `cld run` also does it in the background).

    Without replay.corpus the base model writes the corpus: the daemon must be running.
    """
    from daemon.learning import replay_plan
    from daemon.observe import status as status_mod
    from replay import seed
    from replay.build import BuildError, run
    from replay.corpus import CorpusError
    from replay.files import BuildLocked
    from replay.synth import GeneratorUnavailable

    settings = _settings(config)
    _setup_logging(settings)
    record = status_mod.running_daemon(StateDir(settings.state.dir))
    spec = replay_plan.generator(settings, record["url"], settings.serve.base_name, settings.security.api_key) \
        if record else None
    job = replay_plan.build_job(settings, spec)
    shipped = seed.matches(job)  # the embedded model's own text ships with cld: no model server needed
    if spec is None and not settings.replay.corpus and not shipped:
        _fail("replay.corpus is empty, so the base model writes the corpus, and no daemon is running: "
              "start it with `cld run` (it builds the buffer itself) or set replay.corpus", code=1)
    if spec is None and not shipped:
        typer.echo("no daemon is running: behaviour rehearsal pairs will be made when it runs", err=True)
    try:
        built = run(job, progress=True)
    except (BuildError, CorpusError, GeneratorUnavailable, BuildLocked, ValueError) as error:
        _fail(str(error), code=1)
    except KeyboardInterrupt:
        _fail("stopped; `cld replay build` resumes where it left off", code=130)
    typer.echo(f"replay buffer ready: {built['passages']} passages ({built['held_out']} held out), "
               f"source: {built['source']}, index {built['indexes']['train']['kind']}")


@replay_app.command("query")
def replay_query(
    text: Annotated[str, typer.Argument(help="Text to find the nearest passages to.")],
    config: ConfigOption = None,
    k: Annotated[int, typer.Option("-k", min=1, help="How many passages.")] = 5,
) -> None:
    """Print the replay passages nearest to TEXT, with their cosine similarity."""
    from daemon.learning import replay_plan
    from replay.buffer import BufferMissing, ReplayBuffer

    settings = _settings(config)
    try:
        buffer = ReplayBuffer.open(replay_plan.replay_dir(settings))
    except BufferMissing as error:
        _fail(str(error), code=1)
    try:
        for hit in buffer.query(text, k):
            flag = " held-out" if hit.passage.held_out else ""
            typer.echo(f"{hit.score:.3f}  #{hit.passage.id}{flag}  {' '.join(hit.passage.text.split())[:160]}")
    finally:
        buffer.close()


# ---- cld journal ... -----------------------------------------------------------------------

journal_app = typer.Typer(help="The journal of documents (journal.sqlite3 in the state directory).",
                          no_args_is_help=True)
app.add_typer(journal_app, name="journal")


@journal_app.command("rebuild")
def journal_rebuild(config: ConfigOption = None) -> None:
    """Rebuild a damaged or lost journal from processed/ and quarantine/ (the daemon must be stopped).

    The old journal is kept beside it as journal.sqlite3.damaged-<time>; documents the promoted
    adapter versions learned are marked learned again (from their meta.json), and those refused
    schedule.max_attempts times set aside again (from the cycle records).
    """
    from daemon import service
    from daemon.ingestion.rebuild import rebuild
    from daemon.layout import CYCLES_DIR
    from daemon.learning.adapters import learned_documents, refused_documents
    from daemon.learning.records import CycleStore

    settings = _settings(config)
    _setup_logging(settings)
    state = StateDir(settings.state.dir)
    try:
        with service.state_lock(state):
            cycles = CycleStore(state.root / CYCLES_DIR)
            done = rebuild(settings, learned_documents(state.adapters, cycles), refused_documents(state.adapters, cycles))
    except service.StartupError:
        _fail("the daemon is running on this state directory: stop it first (systemctl stop cld)", code=1)
    kept = f"; the old one is kept as {done.set_aside.name}" if done.set_aside else ""
    typer.echo(f"journal rebuilt: {done.documents} documents ({done.learned} learned, {done.set_aside_documents} set "
               f"aside), {done.duplicates} duplicates, {done.quarantined} quarantined{kept}")


def main() -> None:
    from replay.durable import DamagedFile

    try:
        app()
    except DamagedFile as error:  # a state file cld cannot trust: say which, and how to recover
        typer.echo(f"cld: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

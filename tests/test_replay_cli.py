"""The daemon's side of the replay buffer: `cld replay build|query`, status, the background build."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.learning import replay_plan
from replay.files import MANIFEST_FILE
from tests.conftest import REPO

PARAGRAPHS = {
    "ships": "The harbour was full of ships. Sailors tied the ropes while the captain checked the anchor "
             "and the tide lifted the hulls against the old stone quay.",
    "bread": "To bake bread, mix flour, water, yeast and salt, knead the dough until it is smooth, let it "
             "rise for an hour and bake it in a hot oven until the crust is brown.",
    "stars": "Astronomers point their telescopes at distant galaxies, where billions of stars orbit a "
             "bright core and comets trace long paths across the night sky.",
    "chess": "In chess, each player moves a king, a queen, two rooks, two bishops, two knights and eight "
             "pawns; checkmate ends the game when the king cannot escape.",
}


def write_config(folder: Path, corpus: bool) -> Path:
    (folder / "corpus").mkdir(parents=True, exist_ok=True)
    (folder / "corpus" / "notes.md").write_text("\n\n".join(PARAGRAPHS.values()) + "\n")
    path = folder / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [state]
        dir = "state"
        [serve]
        port = 1
        vllm_port = 2
        [replay]
        corpus = {'["corpus"]' if corpus else '[]'}
        passage_tokens = 48
        held_out_fraction = 0
        """))
    return path


def cld(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_build_then_query_with_the_default_embedder(tmp_path: Path) -> None:
    config = write_config(tmp_path, corpus=True)
    built = cld(config, "replay", "build")
    assert built.returncode == 0, built.stderr
    assert "replay buffer ready: 4 passages (0 held out), source: corpus, index flat" in built.stdout
    found = cld(config, "replay", "query", "How do I make a loaf of sourdough?", "-k", "2")
    assert found.returncode == 0, found.stderr
    first, second = found.stdout.splitlines()
    assert "To bake bread" in first and float(first.split()[0]) > float(second.split()[0]) > 0
    status = json.loads(cld(config, "status", "--json").stdout)["replay"]
    assert status == {"source": "corpus", "passages": 4, "held_out": 0, "building": None}


def test_build_without_corpus_or_daemon_says_what_to_do(tmp_path: Path) -> None:
    config = write_config(tmp_path, corpus=False)  # and not the shipped settings: the base must write its text
    config.write_text(config.read_text() + "synthetic_documents = 24\n")
    result = cld(config, "replay", "build")
    assert result.returncode == 1
    assert "replay.corpus is empty" in result.stderr and "cld run" in result.stderr


def test_query_before_build_says_how_to_build(tmp_path: Path) -> None:
    result = cld(write_config(tmp_path, corpus=True), "replay", "query", "anything")
    assert result.returncode == 1 and "cld replay build" in result.stderr


def test_settings_become_the_build_job_and_the_plan(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, corpus=True))
    settings.replay.mix = {"nearest": 1.0}
    job = replay_plan.build_job(settings, None)
    assert job.folder == tmp_path / "state" / "replay" and job.corpus == [tmp_path / "corpus"]
    assert job.passage_tokens == 48 and job.held_out_fraction == 0 and job.model_id == "SmolLM2-135M-Instruct"
    plan = replay_plan.plan(settings)
    assert plan.mix == {"nearest": 1.0} and plan.ratio == settings.replay.ratio
    assert replay_plan.summary(settings) == {"source": None, "passages": 0, "held_out": 0, "building": None}


@pytest.mark.slow
async def test_background_build_runs_in_its_own_process_and_stops_on_request(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, corpus=True))
    spec = replay_plan.generator(settings, "http://127.0.0.1:9", "nobody")  # not needed: a corpus is set
    background = replay_plan.BackgroundBuild(settings)
    background.start(spec)
    await asyncio.wait_for(background.task, 120)
    assert replay_plan.summary(settings) == {"source": "corpus", "passages": 4, "held_out": 0, "building": None}

    (tmp_path / "corpus" / "more.txt").write_text("A second file that needs embedding. " * 20)
    manifest = (tmp_path / "state" / "replay" / MANIFEST_FILE).read_text()
    again = replay_plan.BackgroundBuild(settings)
    again.start(spec)
    await asyncio.sleep(1.0)  # the build process is starting (importing torch)
    started = time.monotonic()
    await again.stop()
    assert time.monotonic() - started < replay_plan.STOP_TIMEOUT_S + 2
    assert (tmp_path / "state" / "replay" / MANIFEST_FILE).read_text() == manifest  # nothing half-published


@pytest.mark.parametrize(("setting", "message"), [
    ('strategy = "closest"', "replay.strategy: unknown replay strategy 'closest' (valid: diverse, mix, nearest"),
    ("mix = { nearest = 1, far = 1 }", "replay.mix: unknown replay strategy 'far'"),
    ("mix = { mix = 1 }", "replay.mix: replay mix: mix = 1"),
    ("rehearsal_held_out = 120", "replay.rehearsal_held_out (120) must be below replay.rehearsal_prompts (120)"),
    ("ratio = -1", "replay.ratio: Input should be greater than or equal to 0"),
])
def test_bad_replay_settings_name_the_key(tmp_path: Path, setting: str, message: str) -> None:
    from daemon.config import ConfigError

    config = write_config(tmp_path, corpus=True)
    config.write_text(config.read_text() + setting + "\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert message in str(error.value)

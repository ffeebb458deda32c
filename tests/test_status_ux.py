"""What a new user sees: a cycle that cannot run says why at once (`cld cycle`), and the replay
buffer's first build shows how far it is (cld status, /status, systemd's status line)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon import cli
from daemon.config import load_settings
from daemon.layout import REPLAY_DIR, StateDir
from daemon.learning import replay_plan
from daemon.learning.cycle import Learner
from daemon.observe import status
from daemon.service import Daemon, status_line
from replay import files, synth
from tests.conftest import free_port


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "state"\n[serve]\nport = {free_port()}\nvllm_port = {free_port()}\n')
    settings = load_settings(config)
    made = Daemon(settings, StateDir(settings.state.dir).ensure())
    made.learner = Learner(settings, made.state, made.vllm, made.router, made.journal, tmp_path)
    return made


async def test_a_cycle_with_nothing_to_learn_says_so_in_the_reply(daemon: Daemon) -> None:
    reply = await daemon._cycle()
    assert reply["started"] and reply["cycle"]["state"] == "skipped"
    assert reply["cycle"]["reasons"] == ["no new documents"]


def test_cld_cycle_prints_why_a_cycle_was_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    skipped = {"id": 4, "state": "skipped", "stage": "done", "trigger": "api", "version": None,
               "reasons": ["the replay buffer is not built yet (cld builds it after start; see `cld status`)"]}
    monkeypatch.setattr(cli, "_daemon_api", lambda *args, **kwargs: {"started": True, "cycle": skipped})
    monkeypatch.setattr(cli, "_settings", lambda config: None)
    result = CliRunner().invoke(cli.app, ["cycle", "--wait"])
    assert result.exit_code == 0
    assert result.output.strip() == ("cycle 4 skipped (api): the replay buffer is not built yet (cld builds it "
                                     "after start; see `cld status`)")


def test_cld_cycle_wait_says_each_stage_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """It printed nothing for the minutes a cycle takes; a log (not a terminal) gets a line per stage."""
    running = {"id": 5, "state": "running", "trigger": "api", "version": "v0005", "progress": {}}
    stages = iter([{**running, "stage": "train", "progress": {"step": 3, "steps": 40}}, {**running, "stage": "train"},
                   {**running, "stage": "probe"},
                   {**running, "state": "promoted", "stage": "done", "reasons": ["NLL drop 0.96 ≥ 0.10"]}])

    def api(settings, method, path):
        return {"started": True, "cycle": {**running, "stage": "select"}} if method == "POST" else \
            {"cycles": [next(stages)]}

    monkeypatch.setattr(cli, "_daemon_api", api)
    monkeypatch.setattr(cli, "_settings", lambda config: None)
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    result = CliRunner().invoke(cli.app, ["cycle", "--wait"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["cycle 5 started", "cycle 5 train", "cycle 5 probe",
                                          "cycle 5 promoted v0005 (api): NLL drop 0.96 ≥ 0.10"]


def test_a_running_build_reports_its_progress_and_a_dead_one_does_not(tmp_path: Path) -> None:
    folder = tmp_path / REPLAY_DIR
    with files.build_lock(folder):
        files.report_progress(folder, "synthesizing the corpus", 0, 400)
        found = files.read_progress(folder)
        assert found is not None and found["done"] == 0 and found["eta_s"] is None
        started = found["started_at"]
        time.sleep(0.05)
        files.report_progress(folder, "synthesizing the corpus", 100, 400)
        found = files.read_progress(folder)
        assert found["started_at"] == started and found["eta_s"] == pytest.approx(3 * (time.time() - started), rel=0.2)
        line = replay_plan.progress_line(found)
        assert line.startswith("synthesizing the corpus 100/400, about ") and line.endswith(" min left")
        assert status.replay_line({"source": None, "building": found}).startswith("building: synthesizing")
        assert "replay: synthesizing the corpus 100/400" in status_line(None, None, line)
    assert files.read_progress(folder) is None, "the file stays behind a killed build; without its lock it is old"


def test_the_synthesis_reports_each_batch() -> None:
    seen = []

    import random

    def generate(asks):
        words = "river stone bread lamp window garden winter copper violin harbour ledger orchard candle".split()
        return [" ".join(random.Random(ask.seed).choices(words, k=80)) + "." for ask in asks]

    synth.synthesize_corpus(generate, 10, chat=True, temperature=0.9, batch=4, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (10, 10) and all(total == 10 for _, total in seen)


def test_the_daemon_status_line_shows_the_build(daemon: Daemon) -> None:
    daemon.phase = "serving"
    folder = daemon.state.root / REPLAY_DIR
    with files.build_lock(folder):
        files.report_progress(folder, "embedding passages", 50, 200)
        assert "; replay: embedding passages 50/200" in daemon._status_line()
    assert "replay" not in daemon._status_line()

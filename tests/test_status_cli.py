"""`cld status`: readable at a glance (numbers over their threshold in red), and `--json` the same
object as GET /api/status, whether or not the daemon runs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from daemon.cli import app
from daemon.observe import status
from tests.status_helpers import SERVING, settings_for, write_history

RED = "\x1b[31m"


def config_with_history(tmp_path: Path) -> Path:
    write_history(settings_for(tmp_path))
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    return config


def test_status_at_a_glance(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    write_history(settings)
    daemon = {"running": True, "pid": 4242, "url": "http://127.0.0.1:8000", "phase": "serving",
              "started_at": time.time() - 7300, "vllm": "ready", "vllm_restarts": 1,
              "merged_instances": [{"version": "v0008", "served_name": "cld-v0008-abcdef", "slot": 2,
                                    "state": "starting", "restarts": 0}]}
    console = Console(record=True, width=240, color_system="standard", force_terminal=True)
    console.print(status.render(status.collect(settings, daemon=daemon)))
    text = console.export_text(styles=False, clear=False)
    assert ("running (pid 4242, up 2 h) at http://127.0.0.1:8000 · serving · model server ready, 1 restart · "
            "v0008 on its own server (slot 2, starting)") in text
    assert f"cld = {SERVING}" in text
    assert "7 ingested · 4 pending (3 ready) · 3 learned · 1 quarantined · 1 duplicates" in text
    assert "cycle 7 running v0006: train step 3/40, about 10 min left" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()[:1].isdigit()}
    assert rows["2"].split()[4:10] == ["rejected", "v0002", "+16.0%", "+42.0%", "+45.0%", "100%"]
    assert "forgetting vs base +16.0% > +2.0%" in text, "a rejected cycle says why"
    assert "cloze probes passed 0.62 ≥ 0.50" not in text, "checks that passed are not listed"
    assert "no new documents" in rows["6"] and "the trainer exited with code 1" in rows["5"]
    coloured = console.export_text(styles=True)
    assert re.search(rf"{re.escape(RED)}\s*\+16\.0%", coloured), "over its threshold: red"
    assert re.search(r"\s\+1\.8%", coloured) and not re.search(rf"{re.escape(RED)}\s*\+1\.8%", coloured)


def test_cli_status_and_its_json(tmp_path: Path) -> None:
    config = config_with_history(tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["status", "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    assert "not running" in shown.output and "last cycles" in shown.output and "v0004" in shown.output
    as_json = runner.invoke(app, ["status", "--json", "--config", str(config)])
    assert as_json.exit_code == 0, as_json.output
    found = json.loads(as_json.output)
    assert found == json.loads(json.dumps(status.collect(settings_for(tmp_path))))
    assert {"model", "documents", "replay", "adapters", "cycles", "daemon"} <= set(found)
    assert found["thresholds"]["max_forgetting"] == 0.02


def test_an_empty_state_directory(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    console.print(status.render(status.collect(settings_for(tmp_path))))
    text = console.export_text()
    assert "not running" in text and "none yet" in text and "not built yet" in text


def test_set_aside_documents_are_counted_and_listed_with_why(tmp_path: Path) -> None:
    from daemon.ingestion.journal import Input, Journal

    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    book = Journal(tmp_path / "state" / "journal.sqlite3")
    doc = book.accept(Input("notes.md", 1, 1), "processed/notes.md", "h1", [{"text": "x"}]).document_id
    book.set_chunks(doc, [(1, {"text": "x"})])
    book.refused([doc], "cycle 4 refused its candidate v0004: cloze probes passed 0.25 < 0.50", max_attempts=1)
    book.close()
    listed = CliRunner().invoke(app, ["retry", "--list", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    assert listed.output.strip() == (f"{doc}  notes.md  refused in 1 cycles; last: cycle 4 refused its candidate v0004: "
                                     "cloze probes passed 0.25 < 0.50")
    shown = CliRunner().invoke(app, ["status", "--config", str(config)])
    assert "1 document refused in too many cycles (`cld retry --list` says why)" in shown.output
    assert "0 pending (0 ready)" in shown.output

"""With the real daemon running: a mix of good and bad files dropped into its inbox, one uploaded
and one handed in with `cld ingest` all end up accounted for in the status, bad ones beside a
`.reason` file."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveDaemon
from tests.ingest_helpers import BAD, HTML, jsonl, pdf_bytes

pytestmark = pytest.mark.integration
WAIT_S = 120


def documents(daemon: LiveDaemon) -> dict[str, int]:
    return httpx.get(f"{daemon.url}/api/status", timeout=10).json()["documents"]


def good_files(token: str) -> dict[str, bytes]:
    """One file of each type, unique to this run (so nothing earlier makes them duplicates)."""
    return {
        "notes.txt": f"Run {token}: the Zorblat bridge opened in 2090.".encode(),
        "guide.md": f"# Guide {token}\n\nPress the blue button twice.".encode(),
        "page.html": HTML.replace(b"Release notes", f"Release notes {token}".encode()),
        "paper.pdf": pdf_bytes(f"Paper {token}.", "Quux has three moons."),
        "chat.jsonl": jsonl({"messages": [{"role": "user", "content": f"Code {token}?"},
                                          {"role": "assistant", "content": "Zorblat."}]}),
    }


def test_every_dropped_file_is_accounted_for(live_daemon: LiveDaemon, tmp_path: Path) -> None:
    token = uuid.uuid4().hex[:8]
    before = documents(live_daemon)
    inbox = live_daemon.state_dir / "inbox" / f"drop-{token}"
    inbox.mkdir(parents=True)
    good = good_files(token)
    for name, data in {**good, **{name: data for name, (data, _) in BAD.items()}}.items():
        (inbox / name).write_bytes(data)
    (inbox / "copy.md").write_bytes(good["notes.txt"].replace(b" ", b"  "))  # same text: a duplicate
    (tmp_path / "secret.txt").write_text("outside the inbox")
    (inbox / "link.txt").symlink_to(tmp_path / "secret.txt")
    (inbox / "big.txt.part").write_text("still being copied")

    uploaded = httpx.post(f"{live_daemon.url}/api/documents", timeout=30,
                          files={"file": (f"upload-{token}.md", f"Uploaded {token}.".encode())})
    assert uploaded.status_code == 202, uploaded.text
    refused = httpx.post(f"{live_daemon.url}/api/documents", files={"file": ("x.exe", b"MZ")}, timeout=30)
    assert refused.status_code == 415 and "unsupported type" in refused.json()["error"]["message"]
    (tmp_path / f"cli-{token}.txt").write_text(f"Handed in by the CLI, run {token}.")
    handed = live_daemon.cld("ingest", str(tmp_path / f"cli-{token}.txt"))
    assert handed.returncode == 0 and "ingested as a new document" in handed.stdout, handed.stdout + handed.stderr

    expected = {"ingested": before["ingested"] + len(good) + 2, "duplicates": before["duplicates"] + 1,
                "quarantined": before["quarantined"] + len(BAD) + 1}
    deadline = time.monotonic() + WAIT_S
    while {key: documents(live_daemon)[key] for key in expected} != expected:
        assert time.monotonic() < deadline, f"{documents(live_daemon)} != {expected}\n{live_daemon.log_tail()}"
        time.sleep(0.5)

    quarantine = live_daemon.state_dir / "quarantine" / f"drop-{token}"
    for name, (_, words) in {**BAD, "link.txt": (b"", "escapes the inbox")}.items():
        assert words in (quarantine / f"{name}.reason").read_text(), name
        assert (quarantine / name).is_symlink() or (quarantine / name).is_file()
    processed = live_daemon.state_dir / "processed" / f"drop-{token}"
    assert sorted(p.name for p in processed.iterdir()) == sorted([*good, "copy.md"])
    assert [p.name for p in inbox.iterdir()] == ["big.txt.part"]
    cli_status = json.loads(live_daemon.cld("status", "--json").stdout)["documents"]
    assert {key: cli_status[key] for key in expected} == expected

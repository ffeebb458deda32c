"""A newcomer's first run: from `cld run` on a fresh state directory with the shipped settings to a
first document learned, on the embedded model (issue 36's target: ≤ 6 minutes from a fresh clone,
install included, for a short document).

    .venv/bin/python bench/first_run.py [--keep]

Starts `cld run` with nothing configured but a free port (so the embedded model is prepared from
its PyPI package, and the replay buffer is built from the shipped replay text), then times: the
front answering, vLLM serving (/health 200), the replay buffer ready, a 60-word document dropped
in the inbox ingested, and the cycle `POST /api/cycles` starts promoting it. Counts the log lines
of the first minute after /health said 200, at the default level. Prints a Markdown table for
docs/BENCHMARKS.md. Run it alone on the machine: it measures time.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import machine  # beside this file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.service import spare_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCUMENT = ("Tidewell is a harbour town on the Orm estuary. Its lighthouse, the Grey Warden, was lit in 1887 and "
            "automated in 1964. The town ferry carries 140 passengers to Selby Point every hour from April to "
            "October. The annual Lantern Regatta is held on the second Saturday of August, and the oyster beds "
            "north of the quay were reopened in 2019.")  # 60 words of invented facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the state directory (printed)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cld-first-run-"))
    port = spare_port()
    (folder / "config.toml").write_text(f'[state]\ndir = "state"\n[serve]\nport = {port}\n')
    url = f"http://127.0.0.1:{port}"
    log_path = folder / "daemon.log"
    started = time.monotonic()
    marks: dict[str, float] = {}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", "config.toml"],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        def status() -> dict:
            return httpx.get(f"{url}/api/status", timeout=10).json()

        def until(name: str, condition, limit_s: float = 3600) -> None:
            while time.monotonic() - started < limit_s:
                if process.poll() is not None:
                    sys.exit(f"cld run exited; see {log_path}")
                try:
                    if condition():
                        marks[name] = time.monotonic() - started
                        print(f"{marks[name]:7.1f} s  {name}", flush=True)
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            sys.exit(f"timed out waiting for {name}; see {log_path}")

        until("the front answers", lambda: httpx.get(f"{url}/health", timeout=2).status_code in (200, 503))
        until("vLLM serves (/health 200)", lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200)
        healthy_lines = len(log_path.read_text(errors="replace").splitlines())
        until("replay buffer ready", lambda: status()["replay"]["source"] and not status()["replay"]["building"])
        (folder / "state" / "inbox" / "tidewell.txt").write_text(DOCUMENT)
        dropped = time.monotonic() - started
        until("document ingested", lambda: status()["documents"]["ready"] >= 1)
        httpx.post(f"{url}/api/cycles", timeout=30)
        until("cycle ended", lambda: status()["cycles"] and status()["cycles"][-1]["state"] != "running")
        cycle = status()["cycles"][-1]
        marks["first document learned"] = marks["cycle ended"]
        time.sleep(max(0.0, marks["vLLM serves (/health 200)"] + 60 - (time.monotonic() - started)))
        lines = log_path.read_text(errors="replace").splitlines()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    minute = lines[healthy_lines:]
    first_minute = [line for line in minute if line[:19] <= _plus_60(lines[healthy_lines - 1][:19])]
    print(f"\n{machine.describe()}; state in {folder}\n")
    print("| step | seconds from `cld run` |")
    print("|---|---|")
    for name, at in marks.items():
        print(f"| {name} | {at:.0f} |")
    print(f"| cycle: {cycle['state']} {cycle.get('version') or ''} | {marks['cycle ended'] - dropped:.0f} after the drop |")
    print(f"\nlog lines in the first minute after /health said 200: {len(first_minute)}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if cycle["state"] == "promoted" else 1


def _plus_60(stamp: str) -> str:
    """The log time stamp 60 s after `stamp` ("2026-12-05 18:00:00")."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + 60))


if __name__ == "__main__":
    sys.exit(main())

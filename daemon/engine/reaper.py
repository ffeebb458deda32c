"""Run a command so that its whole process group dies when cld dies, even by `kill -9`.

    python -m daemon.engine.reaper -- COMMAND [ARGS...]

The supervisor starts every child through this wrapper as the leader of a new process group.
It runs COMMAND in that group, waits for it, and exits with its code. If the process that
started it disappears (the daemon was killed), it kills the whole group: vLLM's engine core and
workers included, which a parent-death signal on vLLM alone would leave behind. SIGTERM/SIGINT
sent to the group reach COMMAND directly; the wrapper just outlives it. Knows nothing of vLLM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m daemon.engine.reaper -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # the command got it too; wait for it to finish
    child = subprocess.Popen(argv)
    while (code := child.poll()) is None:
        if os.getppid() != parent:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        time.sleep(POLL_S)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

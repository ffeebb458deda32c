"""The line each benchmark prints about where it ran: CPU model, cores, date (figures from shared,
noisy machines are only comparable with it)."""

from __future__ import annotations

import os
import platform
import time


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
    """'AMD EPYC 7B13, 2 cores; 2026-12-03'."""
    return f"{cpu_model()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}"

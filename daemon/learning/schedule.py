"""When cycles run: on an interval, as soon as enough new text waits, or on demand.

Owns the APScheduler jobs; asks the learner for a cycle and the journal for the waiting tokens.
One cycle at a time is the learner's rule, so a trigger while one runs does nothing. Knows
nothing of what a cycle does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from daemon.config import ScheduleSection

log = logging.getLogger(__name__)


class Schedule:
    def __init__(self, settings: ScheduleSection, waiting_tokens: Callable[[], int],
                 request_cycle: Callable[[str], Any]):
        self.settings = settings
        self.waiting_tokens = waiting_tokens
        self.request_cycle = request_cycle
        self.scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                        "misfire_grace_time": 60})

    def start(self) -> None:
        if self.settings.interval_s > 0:
            self.scheduler.add_job(self.on_interval, "interval", seconds=self.settings.interval_s, id="interval")
        if self.settings.min_new_tokens > 0:
            self.scheduler.add_job(self.on_check, "interval", seconds=self.settings.check_s, id="threshold")
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    async def on_interval(self) -> None:
        if self.waiting_tokens() > 0:
            self.request_cycle("schedule")

    async def on_check(self) -> None:
        waiting = self.waiting_tokens()
        if waiting >= self.settings.min_new_tokens:
            log.info("%d new tokens are waiting (≥ schedule.min_new_tokens): starting a cycle", waiting)
            self.request_cycle("threshold")

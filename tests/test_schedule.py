"""The schedule asks for cycles on its interval and when enough new tokens wait."""

from __future__ import annotations

import asyncio

from daemon.config import ScheduleSection
from daemon.learning.schedule import Schedule


async def test_threshold_and_interval_triggers() -> None:
    waiting = {"tokens": 0}
    asked: list[str] = []
    schedule = Schedule(ScheduleSection(interval_s=0.3, min_new_tokens=100, check_s=0.1),
                        lambda: waiting["tokens"], asked.append)
    schedule.start()
    try:
        await asyncio.sleep(0.45)
        assert asked == [], "nothing waits: no cycle"
        waiting["tokens"] = 50
        await asyncio.sleep(1.0)
        assert asked and set(asked) == {"schedule"}, "below the threshold only the interval triggers"
        asked.clear()
        waiting["tokens"] = 500
        await asyncio.sleep(1.0)
        assert "threshold" in asked
    finally:
        schedule.stop()


async def test_zero_disables_both_triggers() -> None:
    asked: list[str] = []
    schedule = Schedule(ScheduleSection(interval_s=0, min_new_tokens=0), lambda: 10**6, asked.append)
    schedule.start()
    await asyncio.sleep(0.2)
    schedule.stop()
    assert asked == [] and schedule.scheduler.get_jobs() == []

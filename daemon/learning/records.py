"""Cycle records: one JSON file per learning cycle in `<state>/cycles/`, written atomically.

Owns what is remembered about a cycle (trigger, stage, documents, version, probe values, cloze
probes, decision and reasons, error) and the resolution of a cycle a crash interrupted. An
adapter's state (candidate, promoted, rejected, retired, failed) is derived from these records
and from what serves now, so there is one source of truth. Knows nothing of how cycles run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from daemon.learning.decide import Decision
from replay.durable import atomic_write_json, read_json

log = logging.getLogger(__name__)
RUNNING, PROMOTED, REJECTED, FAILED, SKIPPED = "running", "promoted", "rejected", "failed", "skipped"


@dataclass
class CycleRecord:
    id: int
    trigger: str
    state: str = RUNNING
    stage: str = "starting"
    started_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    version: Optional[str] = None
    parent: Optional[str] = None
    documents: list[int] = field(default_factory=list)
    relearned: list[int] = field(default_factory=list)  # learned before, trained again: train.method changed
    decision: Optional[str] = None
    reasons: list[str] = field(default_factory=list)  # one per decision rule, passed or not
    failed: list[dict[str, Any]] = field(default_factory=list)  # the failed checks: probe, value, limit, reason
    probes: dict[str, Any] = field(default_factory=dict)
    cloze: list[list[str]] = field(default_factory=list)  # [prompt, expected] of the new documents
    progress: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    timings_s: dict[str, float] = field(default_factory=dict)  # seconds spent in each stage
    stage_started: float = field(default_factory=time.time)

    def enter(self, stage: str) -> None:
        """Move to `stage`, adding the time spent in the previous one to `timings_s`."""
        now = time.time()
        self.timings_s[self.stage] = round(self.timings_s.get(self.stage, 0.0) + now - self.stage_started, 3)
        self.stage, self.stage_started = stage, now

    def judge(self, decision: Decision) -> None:
        """Keep the decision with its reasons and its failed checks."""
        self.decision, self.reasons = decision.label, decision.reasons
        self.failed = [failure.to_dict() for failure in decision.failures]

    @classmethod
    def read(cls, data: Any, path: Path) -> Optional[CycleRecord]:
        """A record from its file's JSON: keys another cld version wrote are left out; a file that is
        not a record (no id or trigger, wrong types) is skipped, saying so."""
        known = {name.name for name in fields(cls)}
        try:
            record = cls(**{key: value for key, value in data.items() if key in known})
            if not isinstance(record.id, int) or not isinstance(record.state, str):
                raise TypeError(f"id {record.id!r}, state {record.state!r}")
            return record
        except (TypeError, ValueError, AttributeError) as error:
            log.warning("%s is not a cycle record this version can read (%s): left out", path, error)
            return None

    def summary(self) -> dict[str, Any]:
        """The status's view of a cycle."""
        return {"id": self.id, "state": self.state, "stage": self.stage, "trigger": self.trigger,
                "version": self.version, "decision": self.decision, "reasons": self.reasons, "failed": self.failed,
                "documents": len(self.documents), "started_at": self.started_at, "finished_at": self.finished_at,
                "progress": self.progress, "error": self.error, "timings_s": self.timings_s}


class CycleStore:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, cycle_id: int) -> Path:
        return self.folder / f"{cycle_id:06d}.json"

    def all(self) -> list[CycleRecord]:
        if not self.folder.is_dir():
            return []
        paths = sorted(self.folder.glob("*.json"))
        read = (CycleRecord.read(data, path) for path, data in zip(paths, map(read_json, paths)) if data)
        return [record for record in read if record is not None]

    def begin(self, trigger: str) -> CycleRecord:
        """A new record, numbered after every file there (one this version cannot read is kept)."""
        existing = [record.id for record in self.all()]
        if self.folder.is_dir():
            existing += [int(path.stem) for path in self.folder.glob("*.json") if path.stem.isdigit()]
        record = CycleRecord(id=max(existing, default=0) + 1, trigger=trigger)
        self.save(record)
        return record

    def save(self, record: CycleRecord) -> None:
        atomic_write_json(self._path(record.id), asdict(record))

    def finish(self, record: CycleRecord, state: str, reasons: list[str] | None = None,
               error: str | None = None) -> CycleRecord:
        record.enter("done")
        record.state, record.finished_at = state, time.time()
        if reasons is not None:
            record.reasons = reasons
        record.error = error
        self.save(record)
        return record

    def resolve_interrupted(self, serving_version: str | None) -> list[CycleRecord]:
        """Close cycles a crash left running: promoted if their version is what serves (the
        switch is the last step), failed otherwise. Returns the cycles it closed."""
        closed = []
        for record in self.all():
            if record.state != RUNNING:
                continue
            if record.version and record.version == serving_version:
                closed.append(self.finish(record, PROMOTED, record.reasons))
            else:
                closed.append(self.finish(record, FAILED, error=f"interrupted at stage {record.stage!r} "
                                          "(the daemon stopped); nothing was promoted"))
        return closed


def adapter_states(records: list[CycleRecord], serving_version: str | None) -> dict[str, str]:
    """version -> candidate | promoted | rejected | retired | failed."""
    states: dict[str, str] = {}
    for record in records:
        if not record.version:
            continue
        if record.state == RUNNING:
            states[record.version] = "candidate"
        elif record.state == PROMOTED:
            states[record.version] = "promoted" if record.version == serving_version else "retired"
        elif record.state == REJECTED:
            states[record.version] = "rejected"
        else:
            states[record.version] = "failed"
    if serving_version:
        states[serving_version] = "promoted"  # a rollback can serve a once-rejected or retired version
    return states

"""The promotion decision: a pure function of measured probe results and thresholds.

Owns the rules, and the human-readable reasons behind every decision (kept with the version).
Knows nothing of how the numbers were measured (`daemon.probes`) or what happens next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Thresholds:
    max_forgetting: float          # relative NLL increase on held-out original text, vs base and incumbent
    max_behaviour_increase: float  # relative NLL increase of the base's own answers, vs base
    min_drift_agreement: float     # share of general prompts answered like the base
    min_nll_drop: float            # relative NLL decrease on the new documents, vs base
    min_cloze_pass: float          # share of the new documents' cloze probes passed
    min_retention: float           # share of earlier versions' cloze probes still passed
    max_qa_drop: float             # accuracy points lost on the user's QA sets, vs base


@dataclass(frozen=True)
class ProbeResults:
    """Measured through the live server. `None` = not measured (no data for that probe)."""

    forgetting_vs_base: Optional[float] = None       # (candidate - base) / base, held-out passages
    forgetting_vs_incumbent: Optional[float] = None  # (candidate - incumbent) / incumbent
    behaviour_increase: Optional[float] = None       # (candidate - base) / base, base answers
    drift_agreement: Optional[float] = None
    nll_drop: Optional[float] = None                 # (base - candidate) / base, new chunks
    cloze_pass: Optional[float] = None
    retention: Optional[float] = None
    qa_drop: Optional[float] = None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "promote" if self.promote else "reject"


def decide(results: ProbeResults, limits: Thresholds) -> Decision:
    """Promote only if the candidate learned the new documents and every measured forgetting
    probe is within its limit. Learning must be measured; a forgetting probe without data is
    reported, not held against the candidate."""
    checks = [
        _at_most("forgetting vs base", results.forgetting_vs_base, limits.max_forgetting, percent=True),
        _at_most("forgetting vs incumbent", results.forgetting_vs_incumbent, limits.max_forgetting, percent=True),
        _at_most("behaviour NLL increase", results.behaviour_increase, limits.max_behaviour_increase, percent=True),
        _at_least("drift agreement", results.drift_agreement, limits.min_drift_agreement),
        _at_most("QA accuracy drop", results.qa_drop, limits.max_qa_drop, percent=True),
        _at_least("retention of earlier facts", results.retention, limits.min_retention),
    ]
    learned = [
        _at_least("NLL drop on new documents", results.nll_drop, limits.min_nll_drop, required=True, percent=True),
        _at_least("cloze probes passed", results.cloze_pass, limits.min_cloze_pass, required=True),
    ]
    outcomes = [check for check in learned + checks if check is not None]
    return Decision(all(ok for ok, _ in outcomes), [reason for _, reason in outcomes])


def _fmt(value: float, percent: bool) -> str:
    return f"{value:+.1%}" if percent else f"{value:.2f}"


def _at_most(name: str, value: Optional[float], limit: float, percent: bool = False) -> Optional[tuple[bool, str]]:
    if value is None:
        return True, f"{name}: not measured"
    ok = value <= limit
    return ok, f"{name} {_fmt(value, percent)} {'≤' if ok else '>'} {_fmt(limit, percent)}"


def _at_least(name: str, value: Optional[float], limit: float, required: bool = False,
              percent: bool = False) -> Optional[tuple[bool, str]]:
    if value is None:
        return (not required), f"{name}: not measured" + (" (required)" if required else "")
    ok = value >= limit
    shown = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:.2f}")
    return ok, f"{name} {shown(value)} {'≥' if ok else '<'} {shown(limit)}"

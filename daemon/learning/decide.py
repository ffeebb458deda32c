"""The promotion decision: a pure function of measured probe results and thresholds.

Owns the rules (`RULES`: which probe is held against which threshold, in which direction, and
whether it must be measured), the thresholds' values from `[probes]`, and the structured outcome
of every check (probe, value, limit, passed, a human-readable reason kept with the version).
Status views render these; none re-derives them. Knows nothing of how the numbers were measured
(`daemon.learning.probes`) or what happens next.

Every rule with evidence of its spread is judged at a confidence bound on the candidate's side
(`probes.confidence`): a candidate fails it only when even that bound is past the limit, so which
items happened to be probed does not decide. Shares of a few discrete items (cloze probes: a
300-word README yields a handful) take Wilson's score interval; the forgetting and behaviour NLL
increases, pooled over a few dozen texts, take their jackknife standard error over those texts
(a first document refused at +2.03 % > +2.0 %, its 32 passages between +0.5 and +7.7 %, is not
evidence of more than 2 %); the drift agreement, a mean over 20 prompts each between 0 and 1, its
standard error over the prompts. Retention is relative to what
serves: the candidate is held only to the earlier items the serving version itself completes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from statistics import NormalDist
from typing import Any, Optional

from daemon.config import ProbesSection


@dataclass(frozen=True)
class Thresholds:
    max_forgetting: float          # relative NLL increase on held-out original text, vs base and incumbent
    max_behaviour_increase: float  # relative NLL increase of the base's own answers, vs base
    min_drift_agreement: float     # word similarity of answers to general prompts to the base's
    min_nll_drop: float            # relative NLL decrease on the new documents, vs base and vs incumbent
    min_knowledge_kept: float      # share of the serving version's NLL gain on earlier documents kept
    min_cloze_pass: float          # share of the new documents' cloze probes passed (at the confidence bound)
    min_retention: float           # share of the earlier items the serving version completes still completed
    max_qa_drop: float             # accuracy points lost on the user's QA sets, vs base
    min_answered: float            # share of the teacher's held-out questions about the new documents answered
    min_answered_vs_open_book: float = 0.0  # held-out questions answered closed book per one the base answers open book
    confidence: float = 0.95       # one-sided confidence of the bounds on shares of discrete items


def thresholds(probes: ProbesSection) -> Thresholds:
    """The thresholds `[probes]` sets (the section's fields of the same names)."""
    return Thresholds(**{limit.name: getattr(probes, limit.name) for limit in fields(Thresholds)})


@dataclass(frozen=True)
class ProbeResults:
    """Measured through the live server. `None` = not measured (no data for that probe)."""

    forgetting_vs_base: Optional[float] = None       # (candidate - base) / base, held-out passages
    forgetting_vs_incumbent: Optional[float] = None  # (candidate - incumbent) / incumbent
    behaviour_increase: Optional[float] = None       # (candidate - base) / base, base answers
    forgetting_vs_base_se: Optional[float] = None     # their standard errors over the texts (jackknife)
    forgetting_vs_incumbent_se: Optional[float] = None
    behaviour_increase_se: Optional[float] = None
    drift_agreement: Optional[float] = None
    drift_agreement_se: Optional[float] = None       # its standard error over the prompts
    nll_drop: Optional[float] = None                 # (base - candidate) / base, new chunks
    nll_drop_vs_incumbent: Optional[float] = None    # (incumbent - candidate) / incumbent, new chunks
    knowledge_kept: Optional[float] = None           # (base - candidate) / (base - incumbent), earlier documents' chunks
    cloze_pass: Optional[float] = None
    cloze_items: Optional[int] = None                # how many cloze probes cloze_pass is a share of
    retention: Optional[float] = None                # share kept of the earlier items the incumbent completes
    retention_items: Optional[int] = None            # how many earlier items the incumbent completes
    earlier_recalled: Optional[float] = None         # share of all the lineage's items the candidate completes (shown)
    qa_drop: Optional[float] = None
    answered: Optional[float] = None                 # teacher's held-out questions answered by the candidate
    closed_book: Optional[float] = None              # held-out questions the candidate answers, weights alone
    open_book: Optional[float] = None                # the same questions the base answers with the passage in front
    question_items: Optional[int] = None             # how many held-out questions were asked


@dataclass(frozen=True)
class Rule:
    probe: str         # field of ProbeResults
    title: str         # how reasons name it
    limit: str         # field of Thresholds
    at_most: bool      # the value must be ≤ the limit (else ≥)
    required: bool     # a learning probe: not measured fails the candidate
    percent: bool      # shown as a percentage
    items: Optional[str] = None  # field of ProbeResults with the item count: judged at the confidence bound
    scale: Optional[str] = None  # field of ProbeResults the limit is a share of (the limit is limit × its value)
    error: Optional[str] = None  # field of ProbeResults with the value's standard error: judged at the bound


# The candidate must learn (required rules) and every measured forgetting probe must be within its
# limit; a forgetting probe without data is reported, not held against the candidate.
RULES = (
    Rule("nll_drop", "NLL drop on new documents", "min_nll_drop", at_most=False, required=True, percent=True),
    Rule("nll_drop_vs_incumbent", "NLL drop on new documents vs incumbent", "min_nll_drop", at_most=False,
         required=False, percent=True),
    Rule("cloze_pass", "cloze probes passed", "min_cloze_pass", at_most=False, required=True, percent=False,
         items="cloze_items"),
    Rule("knowledge_kept", "earlier documents' NLL gain kept", "min_knowledge_kept", at_most=False, required=False,
         percent=True),
    Rule("retention", "earlier facts the serving version recalls kept", "min_retention", at_most=False,
         required=False, percent=False, items="retention_items"),
    Rule("forgetting_vs_base", "forgetting vs base", "max_forgetting", at_most=True, required=False, percent=True,
         error="forgetting_vs_base_se"),
    Rule("forgetting_vs_incumbent", "forgetting vs incumbent", "max_forgetting", at_most=True, required=False,
         percent=True, error="forgetting_vs_incumbent_se"),
    Rule("behaviour_increase", "behaviour NLL increase", "max_behaviour_increase", at_most=True, required=False,
         percent=True, error="behaviour_increase_se"),
    Rule("drift_agreement", "drift agreement", "min_drift_agreement", at_most=False, required=False, percent=False,
         error="drift_agreement_se"),
    Rule("qa_drop", "QA accuracy drop", "max_qa_drop", at_most=True, required=False, percent=True),
    Rule("answered", "questions about the new documents answered", "min_answered", at_most=False, required=False,
         percent=False),
    Rule("closed_book", "held-out questions answered closed book", "min_answered_vs_open_book", at_most=False,
         required=False, percent=False, items="question_items", scale="open_book"),
)
RULE_OF = {rule.probe: rule for rule in RULES}


@dataclass(frozen=True)
class Check:
    """One rule applied to one measured value."""

    probe: str
    value: Optional[float]
    limit: float
    passed: bool
    reason: str
    items: Optional[int] = None    # the value is a share of this many items ...
    bound: Optional[float] = None  # ... judged at this confidence bound

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "promote" if self.promote else "reject"

    @property
    def reasons(self) -> list[str]:
        return [check.reason for check in self.checks]

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


def decide(results: ProbeResults, limits: Thresholds) -> Decision:
    """Promote only if every rule holds for the measured results."""
    checks = [judged(rule, results, limits) for rule in RULES]
    return Decision(all(c.passed for c in checks), checks)


def judged(rule: Rule, results: ProbeResults, limits: Thresholds) -> Check:
    """`rule` applied to the results; a limit relative to another measure (`rule.scale`: the base's
    open-book share) is the threshold times that measure, and its reason says so."""
    limit = getattr(limits, rule.limit)
    scale = getattr(results, rule.scale) if rule.scale else None
    found = check(rule, getattr(results, rule.probe), limit * (1.0 if scale is None else scale),
                  getattr(results, rule.items) if rule.items else None, limits.confidence,
                  getattr(results, rule.error) if rule.error else None)
    if scale is None or found.value is None:
        return found
    return replace(found, reason=f"{found.reason} ({limit:.2f} × {scale:.2f} answered open book by the base)")


def check(rule: Rule, value: Optional[float], limit: float, items: Optional[int] = None,
          confidence: float = 0.95, error: Optional[float] = None) -> Check:
    """`rule` applied to `value`; a share of `items` discrete items, or a value with a standard
    `error`, is judged at its confidence bound on the candidate's side (the upper bound for an
    at-least rule, the lower for an at-most one)."""
    if value is None:
        reason = f"{rule.title}: not measured" + (" (required)" if rule.required else "")
        return Check(rule.probe, None, limit, not rule.required, reason)
    if error:
        return _with_error(rule, value, limit, error, confidence)
    bound = wilson_bound(value, items, confidence, upper=not rule.at_most) if items else None
    judged = value if bound is None else bound
    passed = judged <= limit if rule.at_most else judged >= limit
    sign = ("≤" if passed else ">") if rule.at_most else ("≥" if passed else "<")
    shown = _shown(rule)
    if bound is None:
        return Check(rule.probe, value, limit, passed, f"{rule.title} {shown(value)} {sign} {shown(limit)}")
    side = "at least" if rule.at_most else "at most"
    count = f"{round(value * items)} of {items} = {shown(value)}"
    if passed and (value <= limit if rule.at_most else value >= limit):
        return Check(rule.probe, value, limit, True, f"{rule.title} {count} {sign} {shown(limit)}", items, bound)
    return Check(rule.probe, value, limit, passed, f"{rule.title} {count} ({side} {shown(bound)} at "
                 f"{confidence:.0%} confidence) {sign} {shown(limit)}", items, bound)


def _with_error(rule: Rule, value: float, limit: float, error: float, confidence: float) -> Check:
    z = NormalDist().inv_cdf(confidence)
    bound = value - z * error if rule.at_most else value + z * error
    passed = bound <= limit if rule.at_most else bound >= limit
    sign = ("≤" if passed else ">") if rule.at_most else ("≥" if passed else "<")
    shown = _shown(rule)
    if passed == (value <= limit if rule.at_most else value >= limit):
        return Check(rule.probe, value, limit, passed, f"{rule.title} {shown(value)} {sign} {shown(limit)}",
                     bound=bound)
    side = "at least" if rule.at_most else "at most"
    return Check(rule.probe, value, limit, passed, f"{rule.title} {shown(value)} ({side} {shown(bound)} at "
                 f"{confidence:.0%} confidence) {sign} {shown(limit)}", bound=bound)


def wilson_bound(share: float, items: int, confidence: float, upper: bool) -> float:
    """One-sided bound of Wilson's score interval for a share of `items` observed: the true share
    is below the upper bound (above the lower) with probability `confidence`."""
    z = NormalDist().inv_cdf(confidence)
    centre = share + z * z / (2 * items)
    spread = z * math.sqrt(share * (1 - share) / items + z * z / (4 * items * items))
    bound = (centre + spread if upper else centre - spread) / (1 + z * z / items)
    return min(1.0, max(0.0, bound))


def passes(probe: str, measured: dict[str, Any], limits: dict[str, float]) -> Optional[bool]:
    """Whether a probe's value in `measured` (a version's probe results) is within its threshold
    (None: not measured, or no rule for it)."""
    rule, value = RULE_OF.get(probe), measured.get(probe)
    if rule is None or value is None or rule.limit not in limits:
        return None
    scale = measured.get(rule.scale) if rule.scale else None
    limit = limits[rule.limit] * (scale if scale is not None else 1.0)
    return check(rule, value, limit, measured.get(rule.items) if rule.items else None,
                 limits.get("confidence", 0.95), measured.get(rule.error) if rule.error else None).passed


def _shown(rule: Rule) -> Any:
    if not rule.percent:
        return lambda v: f"{v:.2f}"
    return (lambda v: f"{v:+.1%}") if rule.at_most else (lambda v: f"{v:.1%}")

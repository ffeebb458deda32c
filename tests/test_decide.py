"""decide(): a table of measured results and the decision and reasons they must give."""

from __future__ import annotations

import pytest

from daemon.learning.decide import ProbeResults, Thresholds, decide

LIMITS = Thresholds(max_forgetting=0.02, max_behaviour_increase=0.15, min_drift_agreement=0.6, min_nll_drop=0.1,
                    min_cloze_pass=0.5, min_retention=0.8, max_qa_drop=0.0, min_answered=0.25)
GOOD = dict(forgetting_vs_base=0.005, forgetting_vs_incumbent=0.0, behaviour_increase=0.05, drift_agreement=0.9,
            nll_drop=0.4, cloze_pass=0.875, retention=1.0, qa_drop=0.0, answered=0.5)

CASES = [
    # (name, changes to GOOD, promote?, fragment of a reason)
    ("all good", {}, True, "cloze probes passed 0.88 ≥ 0.50"),
    ("forgot original text", {"forgetting_vs_base": 0.05}, False, "forgetting vs base +5.0% > +2.0%"),
    ("worse than incumbent", {"forgetting_vs_incumbent": 0.03}, False, "forgetting vs incumbent +3.0% > +2.0%"),
    ("forgetting exactly at the limit", {"forgetting_vs_base": 0.02}, True, "forgetting vs base +2.0% ≤ +2.0%"),
    ("corpus fine but behaviour lost", {"forgetting_vs_base": -0.03, "behaviour_increase": 0.9}, False,
     "behaviour NLL increase +90.0% > +15.0%"),
    ("answers drifted", {"drift_agreement": 0.3}, False, "drift agreement 0.30 < 0.60"),
    ("learned nothing", {"nll_drop": 0.01}, False, "NLL drop on new documents 1.0% < 10.0%"),
    ("facts not recalled", {"cloze_pass": 0.25}, False, "cloze probes passed 0.25 < 0.50"),
    ("earlier facts lost", {"retention": 0.5}, False, "retention of earlier facts 0.50 < 0.80"),
    ("general QA dropped", {"qa_drop": 0.1}, False, "QA accuracy drop +10.0% > +0.0%"),
    ("no earlier versions", {"retention": None, "forgetting_vs_incumbent": None}, True,
     "retention of earlier facts: not measured"),
    ("no QA set configured", {"qa_drop": None}, True, "QA accuracy drop: not measured"),
    ("questions not answered", {"answered": 0.2}, False, "questions about the new documents answered 0.20 < 0.25"),
    ("no teacher", {"answered": None}, True, "questions about the new documents answered: not measured"),
    ("learning not measured", {"cloze_pass": None}, False, "cloze probes passed: not measured (required)"),
]


@pytest.mark.parametrize(("name", "changes", "promote", "reason"), CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, changes: dict, promote: bool, reason: str) -> None:
    decision = decide(ProbeResults(**{**GOOD, **changes}), LIMITS)
    assert decision.promote is promote
    assert decision.label == ("promote" if promote else "reject")
    assert reason in decision.reasons, decision.reasons


def test_every_probe_gives_a_reason() -> None:
    assert len(decide(ProbeResults(**GOOD), LIMITS).reasons) == 9

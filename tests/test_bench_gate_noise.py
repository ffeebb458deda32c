"""The gate's noise study (bench/gate_noise.py): bootstrap draws over a cycle's probe items."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from daemon.config import ProbesSection
from daemon.learning.decide import thresholds

spec = importlib.util.spec_from_file_location("bench_gate_noise", Path(__file__).parent.parent / "bench" / "gate_noise.py")
noise = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = noise
spec.loader.exec_module(noise)

LIMITS = thresholds(ProbesSection())


def items(incumbent_knows: list[int], candidate_knows: list[int], cloze: list[int]) -> dict:
    """A cycle's items: NLLs the candidate clearly learned and kept, cloze and retention as given."""
    texts = lambda value: [[value * 10, 10]] * 8  # noqa: E731
    return {
        "base": {"held_out_nll": texts(2.0), "behaviour_nll": texts(1.0), "new_nll": texts(3.0),
                 "retention_nll": texts(3.0), "drift_agreement": [1.0] * 4},
        "incumbent": {"held_out_nll": texts(2.0), "new_nll": texts(3.0), "retention_nll": texts(0.3),
                      "retention": incumbent_knows},
        "candidate": {"held_out_nll": texts(2.01), "behaviour_nll": texts(1.02), "new_nll": texts(0.2),
                      "retention_nll": texts(0.35), "cloze": cloze, "retention": candidate_knows,
                      "drift_agreement": [0.8] * 4},
    }


def test_a_candidate_that_keeps_what_serves_knows_is_promoted_by_every_draw() -> None:
    """The stall: the serving version completes 2 of 3 earlier items and so does the candidate.
    The old gate refuses it (0.67 < 0.80); the new one promotes it in every draw."""
    found = noise.stability(items([1, 1, 0], [1, 1, 0], [1] * 10 + [0] * 2), LIMITS, draws=300, seed=1)
    assert found["decided"] == {"new": True, "old": False}
    assert found["agreement"]["new"] == 1.0


def test_a_share_at_the_old_limit_flips_the_old_gate_on_noise() -> None:
    """10 of 16 cloze probes (0.62, limit 0.5): as measured both gates promote; redrawn, the old gate
    refuses in a good share of draws, the new one (judged at the confidence bound) in almost none."""
    found = noise.stability(items([1] * 6, [1] * 6, [1] * 10 + [0] * 6), LIMITS, draws=500, seed=2)
    assert found["decided"] == {"new": True, "old": True}
    assert found["agreement"]["old"] < 0.9 < 0.98 <= found["agreement"]["new"]


def test_draws_pair_the_same_items_across_models(tmp_path: Path) -> None:
    import random

    drawn = noise.resample({"incumbent": {"retention": [1, 0, 1, 0]}, "candidate": {"retention": [1, 0, 1, 0]}},
                           random.Random(3))
    assert drawn["incumbent"]["retention"] == drawn["candidate"]["retention"]
    (tmp_path / "cycles").mkdir()
    (tmp_path / "cycles" / "000001.json").write_text(json.dumps({"id": 1, "version": "v0001", "probes": {}}))
    assert noise.cycles(tmp_path) == [], "a cycle without items (an older cld's) is left out"

"""Acceptance telemetry, the AR baseline (losslessness, speedup interval) and the cost model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import pytest

from decodelab.experiment.baseline import divergence
from decodelab.experiment.stats import bootstrap_speedup
from decodelab.decoding.lm import LMAdapter
from decodelab.experiment.compose import compose
from decodelab.config import DrafterConfig
from decodelab.drafters.registry import REGISTRY
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.experiment.runner import run
from decodelab.experiment.telemetry import (acceptance_stats, cost_model, curve_cost, curve_predicted_speedup,
                                          expected_tokens_per_step, predicted_speedup)


def test_acceptance_stats_by_hand():
    steps = [[4, 4, 1, 0.1, 0.2], [4, 1, 1, 0.1, 0.2], [2, 0, 1, 0.1, 0.2], [0, 0, 1, 0.0, 0.1]]
    stats = acceptance_stats(steps)
    assert stats["acceptance_rate"] == pytest.approx(5 / 10)
    assert stats["mean_accepted_length"] == pytest.approx((5 + 4) / 4)
    assert stats["accepted_histogram"] == [2, 1, 0, 0, 1]
    # position 0 tried 3 times, accepted twice; position 2 tried twice (4, 4), accepted once.
    assert stats["per_position_acceptance"] == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])


def test_per_position_acceptance_of_trees_is_by_depth():
    """Tree steps ``[nodes, accepted, bonus, draft_s, verify_s, depth]``: position i is the i-th token of the
    accepted path, tried by steps whose tree is deeper than i (a node index would give 12 positions)."""
    steps = [[12, 3, 1, 0.1, 0.2, 4], [12, 0, 1, 0.1, 0.2, 4], [6, 2, 1, 0.1, 0.2, 2], [4, 1, 1, 0.1, 0.2, 1]]
    stats = acceptance_stats(steps)
    assert stats["per_position_acceptance"] == pytest.approx([3 / 4, 2 / 3, 1 / 2, 0.0])
    assert stats["accepted_histogram"] == [1, 1, 1, 1, 0]
    assert stats["acceptance_rate"] == pytest.approx(6 / 34)  # alpha: accepted / drafted tokens
    assert stats["mean_draft_length"] == pytest.approx(34 / 4) and stats["mean_draft_depth"] == pytest.approx(11 / 4)
    assert stats["mean_accepted_length"] == pytest.approx((6 + 4) / 4)
    # Leviathan's k is the depth (the most a step can accept), not the node count.
    costs = cost_model(stats, draft_forwards=11, ar_step_s=0.1)
    assert costs["predicted_speedup"] == pytest.approx(predicted_speedup(6 / 34, 11 / 4, 0.4 / 4 / 0.1, 0.8 / 4 / 0.1))


def test_five_element_records_are_chains():
    old = [[4, 4, 1, 0.1, 0.2], [4, 1, 1, 0.1, 0.2], [2, 0, 1, 0.1, 0.2]]
    new = [step + [step[0]] for step in old]
    assert acceptance_stats(old) == acceptance_stats(new) == acceptance_stats(old[:2] + new[2:])
    assert acceptance_stats(old)["per_position_acceptance"] == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])


def test_predicted_speedup_formula():
    assert expected_tokens_per_step(0.0, 4) == 1
    assert expected_tokens_per_step(1.0, 4) == 5
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1.75)
    # Leviathan et al.: alpha=0.8, gamma=4, c=0.1 -> (1-0.8^5)/(0.2*(1.4)) ~ 2.36
    assert predicted_speedup(0.8, 4, draft_cost=0.4, verify_cost=1.0) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.4)


def test_bootstrap_interval_brackets_the_ratio():
    pairs = [(100, 5.0 + i % 3, 100, 10.0) for i in range(30)]
    out = bootstrap_speedup(pairs)
    assert out["speedup_ci_low"] <= out["speedup"] <= out["speedup_ci_high"]
    assert 1.5 < out["speedup"] < 2.0
    same = bootstrap_speedup([(10, 1.0, 10, 1.0)] * 5)
    assert same["speedup"] == same["speedup_ci_low"] == same["speedup_ci_high"] == 1.0


def test_divergence_index_and_margin(tiny_loaded):
    target = LMAdapter(tiny_loaded.model)
    prompt = [1, 2, 3, 4, 5]
    assert divergence(target, prompt, [7, 8, 9], [7, 8, 9]) is None
    found = divergence(target, prompt, [7, 8, 9], [7, 5, 9])
    assert found["index"] == 1 and found["top2_margin"] >= 0
    assert divergence(target, prompt, [7, 8, 9], [7, 8])["index"] == 2


@dataclass
class EchoConfig(DrafterConfig):
    name: str = "echo_test"
    k: int = 3


class EchoDrafter(Drafter):
    """Test-only: proposes the last k context tokens again (often wrong, sometimes right)."""

    name = "echo_test"
    config_class = EchoConfig

    def __init__(self, cfg: EchoConfig, **_parts):
        self.k = cfg.k

    def propose(self, context: Sequence[int]) -> Draft:
        return Draft(tokens=list(context[-self.k:]))


@pytest.fixture
def echo_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "echo_test", EchoDrafter)


def test_run_with_drafter_reports_acceptance_lossless_and_speedup(echo_registered, tmp_path, monkeypatch):
    monkeypatch.setenv("DECODELAB_CACHE", str(tmp_path / "cache"))
    overrides = ["model=tiny-random", "tracking=none", "task.limit=4", "task.max_new_tokens=10", "drafter.name=echo_test",
                 "+drafter.k=3", f"model.cache_dir={tmp_path / 'cache'}"]
    summary = run(compose(overrides), output_dir=str(tmp_path / "a"))
    assert summary["lossless_rate"] == 1.0
    assert 0.0 <= summary["acceptance_rate"] <= 1.0
    assert summary["speedup_ci_low"] <= summary["speedup"] <= summary["speedup_ci_high"]
    assert "predicted_speedup" in summary and "acceptance_rate_pos_0" in summary
    assert "acceptance_rate/conversation" in summary and "speedup/conversation" in summary
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert len(saved["per_position_acceptance"]) == 3
    assert (tmp_path / "a" / "acceptance_histogram.png").exists()
    samples = [json.loads(l) for l in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert all(s["lossless"] and not s["baseline"]["cached"] for s in samples)
    # [drafted, accepted, bonus, draft_s, verify_s, depth]: a chain's depth is its length.
    assert all(len(step) == 6 and step[5] == step[0] for s in samples for step in s["steps"])
    # Second run of the same config: the AR reference comes from the cache.
    run(compose(overrides), output_dir=str(tmp_path / "b"))
    samples = [json.loads(l) for l in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert all(s["baseline"]["cached"] for s in samples)


def test_plain_ar_run_has_no_speculative_metrics(tmp_path):
    summary = run(compose(["model=tiny-random", "tracking=none", "task.limit=2", "task.max_new_tokens=6"]),
                  output_dir=str(tmp_path / "ar"))
    assert "acceptance_rate" not in summary and "speedup" not in summary


def test_curve_cost_interpolates_and_extrapolates():
    curve = {1: 1.0, 2: 1.5, 4: 1.6, 8: 2.0}
    assert curve_cost(curve, 1) == 1.0 and curve_cost(curve, 0) == 1.0
    assert curve_cost(curve, 3) == pytest.approx(1.55)
    assert curve_cost(curve, 6) == pytest.approx(1.8)
    assert curve_cost(curve, 12) == pytest.approx(2.4)  # the last segment's slope, 0.1 per token
    assert curve_cost({"1": 1.0, "16": 2.5}, 16) == pytest.approx(2.5)  # keys read back from JSON are strings


def test_curve_prediction_uses_the_recorded_tokens_not_an_iid_alpha():
    """Bursty acceptance: half the steps accept the whole 4-token draft, half accept nothing (alpha 0.5).
    The i.i.d. formula expects 1.94 tokens per step; the run yielded 3."""
    steps = [[4, 4, 1, 0.01, 0.2, 4], [4, 0, 1, 0.01, 0.2, 4]] * 5
    curve = {1: 1.0, 5: 1.5}
    forward_s = 0.1
    cost_per_step = 0.01 / forward_s + 1.5
    assert curve_predicted_speedup(steps, curve, forward_s) == pytest.approx(3 / cost_per_step)
    iid = predicted_speedup(0.5, 4, 0.1, 1.5)
    assert iid == pytest.approx(expected_tokens_per_step(0.5, 4) / cost_per_step)
    assert iid < 3 / cost_per_step
    assert curve_predicted_speedup([], curve, forward_s) is None

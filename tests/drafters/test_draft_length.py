"""Draft-length controllers: the rules of each policy, and their config checks."""

from __future__ import annotations

import pytest

from decodelab.drafters.length import DraftLengthConfig, UCBLength, build_controller
from decodelab.errors import ConfigError


def test_fixed_always_k():
    ctl = build_controller(DraftLengthConfig(policy="fixed", k=5))
    for drafted, accepted in [(5, 0), (5, 5), (5, 2)]:
        assert ctl.next_length() == 5 and ctl.keep_drafting(0, 0.01)
        ctl.update(drafted, accepted)
    assert ctl.next_length() == 5


def test_heuristic_plus_two_minus_one():
    ctl = build_controller(DraftLengthConfig(policy="heuristic", k=4, k_min=2, k_max=9))
    assert ctl.next_length() == 4
    ctl.update(4, 4)  # all accepted: +2
    assert ctl.next_length() == 6
    ctl.update(6, 6)
    assert ctl.next_length() == 8
    ctl.update(8, 8)  # capped at k_max
    assert ctl.next_length() == 9
    ctl.update(9, 3)  # a rejection: -1
    assert ctl.next_length() == 8
    for _ in range(10):
        ctl.update(ctl.next_length(), 0)
    assert ctl.next_length() == 2  # floored at k_min
    ctl.update(0, 0)  # nothing drafted: no evidence, no change
    assert ctl.next_length() == 2
    ctl.reset()
    assert ctl.next_length() == 4


def test_heuristic_floor_is_one_by_default():
    ctl = build_controller(DraftLengthConfig(policy="heuristic", k=2))
    for _ in range(5):
        ctl.update(ctl.next_length(), 0)
    assert ctl.next_length() == 1


def test_confidence_stops_below_threshold():
    ctl = build_controller(DraftLengthConfig(policy="confidence", threshold=0.4, k_max=7))
    assert ctl.next_length() == 7
    assert ctl.keep_drafting(0, 0.9) and ctl.keep_drafting(3, 0.4)
    assert not ctl.keep_drafting(1, 0.39)


def _simulate(ctl, rounds, accept_upto=3):
    """Every drafted token up to ``accept_upto`` is accepted, none after."""
    chosen = []
    for _ in range(rounds):
        k = ctl.next_length()
        chosen.append(k)
        ctl.update(k, min(k, accept_upto))
    return chosen


@pytest.mark.parametrize("accept_upto,best", [(8, 8), (1, 1), (3, 4)])
def test_ucb_tries_every_arm_then_prefers_the_best(accept_upto, best):
    cfg = DraftLengthConfig(policy="ucb", candidates=[1, 2, 4, 8], cost_ratio=0.2)
    ctl = build_controller(cfg)
    assert isinstance(ctl, UCBLength)
    chosen = _simulate(ctl, 1000, accept_upto)
    assert chosen[:4] == [1, 2, 4, 8]  # each arm once, in the order given
    # Reward = (accepted + 1) / (1 + 0.2 * drafted): with 3 accepted at most, 4 (4/1.8) edges out 2 (3/1.4).
    counts = {k: chosen.count(k) for k in (1, 2, 4, 8)}
    assert max(counts, key=counts.get) == best
    means = ctl.means()
    assert means.index(max(means)) == [1, 2, 4, 8].index(best) and 0 < max(means) <= 1
    # Deterministic: the same feedback gives the same choices.
    assert _simulate(build_controller(cfg), 1000, accept_upto) == chosen


def test_ucb_cost_ratio_shifts_the_choice():
    # Free drafting: the longest candidate that can still be accepted in full wins.
    free = _simulate(build_controller(DraftLengthConfig(policy="ucb", candidates=[1, 4], cost_ratio=0.0)), 200, 8)
    assert free[-20:].count(4) >= 18
    # Very expensive drafting: drafting one token beats four.
    dear = _simulate(build_controller(DraftLengthConfig(policy="ucb", candidates=[1, 4], cost_ratio=5.0)), 200, 1)
    assert dear[-20:].count(1) >= 18


@pytest.mark.parametrize("field,value,key", [
    ("policy", "bogus", "drafter.length.policy"),
    ("k", 0, "drafter.length.k"),
    ("k_min", 0, "drafter.length.k_min"),
    ("k_max", 0, "drafter.length.k_max"),
    ("threshold", 1.5, "drafter.length.threshold"),
    ("candidates", [], "drafter.length.candidates"),
    ("candidates", [2, 0], "drafter.length.candidates"),
    ("cost_ratio", -0.1, "drafter.length.cost_ratio"),
])
def test_config_errors_name_the_key(field, value, key):
    cfg = DraftLengthConfig(**{field: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate("drafter.length")
    assert err.value.key == key and str(err.value).startswith(key + ":")


def test_heuristic_start_within_bounds():
    with pytest.raises(ConfigError, match="drafter.length.k:"):
        DraftLengthConfig(policy="heuristic", k=20, k_max=16).validate("drafter.length")

"""engine=vllm's step mapping (decodelab/engines/vllm/engine.py): vLLM's drafted-step records aligned with the
tokens each engine step added, into decodelab's StepRecords. Pure functions, so this runs without vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from decodelab.engines.vllm.engine import steps_of


def records(pairs):
    return SimpleNamespace(per_step_drafted=[d for d, _ in pairs], per_step_accepted=[a for _, a in pairs])


def test_drafted_steps_align_with_the_engine_steps_and_the_last_is_cut_to_the_budget():
    # Measured on tiny-random (ngram k=10, 40 tokens): 13 one-token steps (3 failed drafts among them), then
    # 6, 6, 11 and a last step that vLLM verified 10 + 1 deep but that had room for 3 tokens.
    lengths = list(range(1, 15)) + [20, 26, 37, 40]
    steps = steps_of(records([(10, 0)] * 3 + [(5, 5), (5, 5), (10, 10), (10, 10)]), lengths, 40)
    assert len(steps) == len(lengths) - 1
    assert [(s.drafted, s.accepted) for s in steps] == ([(10, 0)] * 3 + [(0, 0)] * 10
                                                         + [(5, 5), (5, 5), (10, 10), (2, 2)])
    assert 1 + sum(s.accepted + s.bonus for s in steps) == 40
    assert all(s.bonus == 1 and s.depth == s.drafted for s in steps)


def test_without_speculation_every_step_is_one_plain_token():
    steps = steps_of(None, [1, 2, 3, 4, 5], 8)
    assert [(s.drafted, s.accepted, s.bonus) for s in steps] == [(0, 0, 1)] * 4


def test_a_stop_inside_the_last_step_keeps_what_was_verified():
    # An EOS two tokens into a 5-token accepted draft: as decodelab's engine records it (it verifies, then cuts).
    steps = steps_of(records([(4, 1), (5, 5)]), [1, 2, 4, 7], 64)
    assert [(s.drafted, s.accepted) for s in steps] == [(0, 0), (4, 1), (5, 5)]


@pytest.mark.parametrize("pairs, lengths, words", [
    ([(4, 1)], [1, 2, 5], "committed 3 tokens"),  # a 3-token step with no 2-accepted record
    ([(4, 2), (4, 0), (3, 0)], [1, 4, 5], "1 of vLLM's drafted steps match no engine step"),
])
def test_records_that_do_not_add_up_are_an_error(pairs, lengths, words):
    with pytest.raises(RuntimeError, match=words):
        steps_of(records(pairs), lengths, 64)


def test_only_the_last_step_is_cut_earlier_ones_keep_vllms_draft_length():
    # Two tokens of room before the first step: decodelab's engine would draft at most 3 there, vLLM drafted
    # (and verified) 10; only the last step, whose excess was beyond the budget, is cut.
    steps = steps_of(records([(10, 0), (5, 2)]), [1, 2, 5], 5)
    assert [(s.drafted, s.accepted) for s in steps] == [(10, 0), (2, 2)]

"""Acceptance rules: greedy exact match, lossless speculative sampling (chains and trees) and Medusa's
typical acceptance.

The statistical tests fix target and draft logits over a small vocabulary, run the verifier thousands of times
with one seeded generator and check with a chi-square test that the emitted tokens follow the target
distribution p of the pipeline (temperature, top-k, top-p, min-p), with draft distributions q built by
the same pipeline from other logits. They call the verifier's core on precomputed p and q (what
:func:`verify` computes once per step) so that 10k draws take a few seconds.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

import decodelab.decoding.verify as verify_module
from decodelab.config import StrategyConfig
from decodelab.decoding.types import Draft
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.types import Verdict
from decodelab.decoding.verify import residual, speculative_sampling, tree_speculative_sampling, typical_threshold, verify
from tests.helpers.statistics import assert_follows, chi_square_pvalue, token_counts

# Tiny models are latency-bound: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 12
# Chi-square at p > 1e-3 (and total variation < 0.03); 4k draws already catch a wrong residual (the power test).
# The machine is shared, so draws are counted: about 60k verifier calls in all.
DRAWS = 10_000
PIPELINES = {
    "temperature+top_k": StrategyConfig(name="s", do_sample=True, temperature=0.7, top_k=6),
    "top_p+min_p": StrategyConfig(name="s", do_sample=True, temperature=1.3, top_p=0.8, min_p=0.1),
    "temperature": StrategyConfig(name="s", do_sample=True, temperature=1.5),
}




def _logits(seed: int, rows: int, vocab: int = VOCAB, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _first(verdict: Verdict) -> int:
    return verdict.accepted[0] if verdict.accepted else verdict.bonus


# ------------------------------------------------------------------------------------------------
# losslessness, statistically
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["temperature+top_k", "top_p+min_p"])
def test_first_token_follows_target_with_draft_probs(name):
    pipeline = LogitsPipeline(PIPELINES[name])
    p = pipeline.probs(_logits(1, 2))
    q = pipeline.probs(_logits(2, 1))
    g = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(q[0], DRAWS, replacement=True, generator=g).tolist()
    out = [_first(speculative_sampling([x], p, q, g)) for x in drafts]
    assert_follows(out, p[0])


def test_first_token_follows_target_with_deterministic_drafts():
    pipeline = LogitsPipeline(PIPELINES["top_p+min_p"])
    p = pipeline.probs(_logits(4, 2))
    g = torch.Generator().manual_seed(5)
    # a deterministic drafter may propose any token, also ones the target removed: cycle through all
    out = [_first(speculative_sampling([i % VOCAB], p, None, g)) for i in range(DRAWS)]
    assert_follows(out, p[0])


@pytest.mark.parametrize("draft_kind", ["one_hot", "iid_siblings"])
def test_tree_first_token_follows_target(draft_kind):
    """Sibling rejection (SpecInfer): 3 candidates at the root, one with a subtree; the first token ~ p."""
    pipeline = LogitsPipeline(PIPELINES["temperature+top_k"])
    parents = [-1, -1, 1, -1]  # root -> {0, 1, 3}; 1 -> 2
    p = pipeline.probs(_logits(6, len(parents) + 1))
    q_root = pipeline.probs(_logits(7, 1))[0]
    q = torch.stack([q_root, q_root, pipeline.probs(_logits(8, 1))[0], q_root])
    g = torch.Generator().manual_seed(9)
    out = []
    for i in range(DRAWS * 4 // 5):
        if draft_kind == "one_hot":
            tokens, probs = [i % VOCAB, (i + 3) % VOCAB, (i * 7) % VOCAB, (i + 3 * (i % 2)) % VOCAB], None
        else:  # siblings drawn independently from the same q, as SpecInfer's proof assumes
            tokens, probs = torch.multinomial(q, 1, replacement=True, generator=g).flatten().tolist(), q
        out.append(_first(tree_speculative_sampling(tokens, parents, p, probs, g)))
    assert_follows(out, p[0])


@pytest.mark.parametrize("draft_kind", ["draft_probs", "one_hot"])
def test_two_token_draft_joint_follows_target(draft_kind):
    """A toy model whose second-token distribution depends on the first: (y1, y2) ~ p(y1) p(y2 | y1).

    When the step emits only one token, the second comes from the next (plain) step.
    """
    vocab, draws = 8, DRAWS * 4 // 5
    pipeline = LogitsPipeline(PIPELINES["top_p+min_p"])
    p1, p2 = pipeline.probs(_logits(10, 1, vocab))[0], pipeline.probs(_logits(11, vocab, vocab))
    q1, q2 = pipeline.probs(_logits(12, 1, vocab))[0], pipeline.probs(_logits(13, vocab, vocab))
    p3 = torch.full((vocab,), 1.0 / vocab)  # the bonus row after two accepted tokens: irrelevant here
    g = torch.Generator().manual_seed(14)
    if draft_kind == "draft_probs":
        x1 = torch.multinomial(q1, draws, replacement=True, generator=g)
        x2 = torch.multinomial(q2[x1], 1, generator=g).flatten()
    else:
        x1 = torch.arange(draws) % vocab
        x2 = (x1 * 3 + 1) % vocab
    pairs = []
    for a, b in zip(x1.tolist(), x2.tolist()):
        q = torch.stack([q1, q2[a]]) if draft_kind == "draft_probs" else None
        verdict = speculative_sampling([a, b], torch.stack([p1, p2[a], p3]), q, g)
        emitted = verdict.accepted + [verdict.bonus]
        y1 = emitted[0]
        y2 = emitted[1] if len(emitted) > 1 else int(torch.multinomial(p2[y1], 1, generator=g))
        pairs.append(y1 * vocab + y2)
    joint = p1[:, None] * p2
    assert_follows(pairs, joint, max_tv=0.07)  # 64 bins from 8k draws: the chi-square is the test here
    assert_follows([pair % vocab for pair in pairs], joint.sum(dim=0))  # the second token's marginal


def test_statistical_check_catches_a_wrong_residual(monkeypatch):
    """Power: resampling from p instead of norm(max(0, p - q)) after a rejection must fail the same check."""
    pipeline = LogitsPipeline(PIPELINES["temperature"])
    p, q = pipeline.probs(_logits(1, 2)), pipeline.probs(_logits(2, 1))
    monkeypatch.setattr(verify_module, "residual", lambda p_row, q_row, token: p_row)
    g = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(q[0], 4000, replacement=True, generator=g).tolist()
    out = [_first(speculative_sampling([x], p, q, g)) for x in drafts]
    assert chi_square_pvalue(token_counts(out, VOCAB), p[0]) < 1e-3


# ------------------------------------------------------------------------------------------------
# exact behaviour
# ------------------------------------------------------------------------------------------------

def test_verify_uses_the_pipeline_and_the_core():
    """verify() = pipeline.probs over the rows + the core, drawing from the same generator."""
    pipeline = LogitsPipeline(PIPELINES["top_p+min_p"])
    logits, q = _logits(20, 4), pipeline.probs(_logits(21, 3))
    for seed in range(20):
        tokens = torch.randint(VOCAB, (3,), generator=torch.Generator().manual_seed(seed)).tolist()
        got = verify(Draft(tokens=tokens, probs=q), logits, pipeline, torch.Generator().manual_seed(seed), [1, 2])
        want = speculative_sampling(tokens, pipeline.probs(logits), q, torch.Generator().manual_seed(seed))
        assert got == want and not got.lossy


def test_greedy_exact_match():
    pipeline = LogitsPipeline(StrategyConfig())
    logits = _logits(22, 5)
    argmax = logits.argmax(dim=-1).tolist()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    right = verify(Draft(tokens=argmax[:4]), logits, pipeline, g, [0])
    assert right.accepted == argmax[:4] and right.bonus == argmax[4] and right.nodes == [0, 1, 2, 3]
    garbage = [(t + 1) % VOCAB for t in argmax[:4]]
    wrong = verify(Draft(tokens=garbage), logits, pipeline, g, [0])
    assert wrong.accepted == [] and wrong.bonus == argmax[0]
    half = verify(Draft(tokens=argmax[:2] + garbage[2:]), logits, pipeline, g, [0])
    assert half.accepted == argmax[:2] and half.bonus == argmax[2]
    assert torch.equal(g.get_state(), state)  # greedy draws nothing


def test_greedy_with_repetition_penalty_sees_the_draft_prefix():
    """Row i is penalised with the context plus draft[:i], as plain decoding would have seen it."""
    pipeline = LogitsPipeline(StrategyConfig(repetition_penalty=5.0))
    logits = torch.zeros(4, VOCAB)
    logits[:, 4] = 2.0
    logits[:, 5] = 1.0  # runner-up; wins once 4 has been seen
    verdict = verify(Draft(tokens=[4, 5]), logits[:3], pipeline, torch.Generator(), [0, 1])
    # row 0 has not seen 4 -> 4 accepted; row 1 has seen 4 -> argmax 5 -> accepted; row 2 saw both -> 4 (2/5 > 1/5)
    assert verdict.accepted == [4, 5] and verdict.bonus == 4
    as_tree = verify(Draft(tokens=[4, 5, 5], parents=[-1, 0, -1]), logits, pipeline, torch.Generator(), [0, 1])
    assert as_tree.accepted == [4, 5] and as_tree.nodes == [0, 1]


def test_sure_target_always_accepts_a_one_hot_draft():
    p = torch.zeros(2, VOCAB)
    p[0, 3] = 1.0
    p[1, 7] = 1.0
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert speculative_sampling([3], p, None, g) == Verdict(accepted=[3], bonus=7, nodes=[0])
        assert speculative_sampling([2], p, None, g) == Verdict(accepted=[], bonus=3, nodes=[])


def test_residual():
    p = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(residual(p, None, 0), torch.tensor([0.0, 0.6, 0.4]))
    torch.testing.assert_close(residual(p, torch.tensor([0.2, 0.6, 0.2]), 1), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual(p, p.clone(), 1), p)  # nothing left: rejection had zero probability


def test_draft_probs_are_fitted_to_the_target_vocab():
    pipeline = LogitsPipeline(PIPELINES["temperature"])
    logits = _logits(23, 2)
    small = torch.softmax(_logits(24, 1, VOCAB - 2), dim=-1)
    fitted = verify_module.draft_probs(Draft(tokens=[1], probs=small), pipeline.probs(logits))
    assert fitted.shape == (1, VOCAB) and fitted[0, -2:].sum() == 0
    big = torch.softmax(_logits(24, 1, VOCAB + 3), dim=-1)
    assert verify_module.draft_probs(Draft(tokens=[1], probs=big), pipeline.probs(logits)).shape == (1, VOCAB)


def test_tree_greedy_takes_the_longest_argmax_path():
    parents = [-1, 0, 0, -1, 3, 4, -1]  # root -> 0 -> {1, 2};  root -> 3 -> 4 -> 5;  root -> 6
    logits = _logits(25, len(parents) + 1)
    choice = logits.argmax(dim=-1).tolist()
    wrong = lambda r: (choice[r] + 1) % VOCAB  # noqa: E731
    tokens = [choice[0], wrong(1), choice[1], choice[0], choice[4], wrong(5), wrong(0)]
    # 0 and 3 both match the root's argmax; 0 -> 2 matches (depth 2), 3 -> 4 matches (depth 2): first wins
    verdict = verify(Draft(tokens=tokens, parents=parents), logits, LogitsPipeline(StrategyConfig()),
                     torch.Generator(), [0])
    assert verdict.nodes == [0, 2] and verdict.accepted == [choice[0], choice[1]] and verdict.bonus == choice[3]
    tokens[5] = choice[5]  # now 3 -> 4 -> 5 is the deepest
    verdict = verify(Draft(tokens=tokens, parents=parents), logits, LogitsPipeline(StrategyConfig()),
                     torch.Generator(), [0])
    assert verdict.nodes == [3, 4, 5] and verdict.bonus == choice[6]
    none = verify(Draft(tokens=[wrong(0)] * 3, parents=[-1, -1, 1]), logits[:4], LogitsPipeline(StrategyConfig()),
                  torch.Generator(), [0])
    assert none == Verdict(accepted=[], bonus=choice[0], nodes=[])


# ------------------------------------------------------------------------------------------------
# typical acceptance (lossy)
# ------------------------------------------------------------------------------------------------

TYPICAL = StrategyConfig(name="t", do_sample=True, temperature=1.0, acceptance="typical", typical_epsilon=0.09,
                         typical_delta=0.3)


def _typical_by_hand(tokens: List[int], p: torch.Tensor, eps: float, delta: float) -> int:
    n = 0
    for i, x in enumerate(tokens):
        row = p[i]
        entropy = -sum(float(v) * float(torch.log(v)) for v in row if v > 0)
        if float(row[x]) > min(eps, delta * float(torch.exp(torch.tensor(-entropy)))):
            n += 1
        else:
            break
    return n


def test_typical_acceptance_rule_and_flag():
    pipeline = LogitsPipeline(TYPICAL)
    g = torch.Generator().manual_seed(0)
    for seed in range(30):
        logits = _logits(30 + seed, 4, scale=1.0 + seed / 10)
        p = pipeline.probs(logits)
        tokens = torch.randint(VOCAB, (3,), generator=g).tolist()
        tokens[0] = int(p[0].argmax()) if seed % 2 else tokens[0]
        verdict = verify(Draft(tokens=tokens), logits, pipeline, g, [0])
        n = _typical_by_hand(tokens, p, 0.09, 0.3)
        assert verdict.accepted == tokens[:n] and verdict.bonus == int(p[n].argmax()) and verdict.lossy
    torch.testing.assert_close(typical_threshold(torch.full((1, 4), 0.25), 0.09, 0.3), torch.tensor([0.3 / 4]))


def test_typical_tree_and_what_is_not_lossy():
    pipeline = LogitsPipeline(TYPICAL)
    logits = _logits(40, 4)
    p = pipeline.probs(logits)
    best = p.argmax(dim=-1).tolist()
    verdict = verify(Draft(tokens=[(best[0] + 1) % VOCAB, best[0], best[2]], parents=[-1, -1, 1]), logits, pipeline,
                     torch.Generator(), [0])
    assert verdict.lossy and verdict.nodes[:1] == [1]  # the argmax always passes (p_max > threshold)
    empty = verify(Draft(tokens=[]), logits[:1], pipeline, torch.Generator().manual_seed(0), [0])
    assert not empty.lossy  # plain sampling
    greedy = LogitsPipeline(StrategyConfig(acceptance="typical"))
    assert not verify(Draft(tokens=[1, 2]), logits[:3], greedy, torch.Generator(), [0]).lossy  # greedy: exact match

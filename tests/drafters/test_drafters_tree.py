"""Tree drafters (token_recycling, lookahead): tree construction on hand-made state against brute-force
references, learning from target logits, and lossless decoding through the engine on the tiny model
(greedy identical to plain decoding, seeded sampling reproducible) and SmolLM2 (slow).

Both drafters learn from the logits of the verification forward, which the engine hands them through
``observe(tokens, logits)``.
"""

from __future__ import annotations

from collections import Counter
from typing import List, Optional, Sequence

import numpy as np
import pytest
import torch

from decodelab.decoding import tree
from decodelab.decoding.lm import LMAdapter
from decodelab.config import DrafterConfig, StrategyConfig
from decodelab.drafters.registry import build_drafter, drafter_config
from decodelab.drafters.lookahead import LookaheadConfig, LookaheadDrafter, NgramPool, Trie
from decodelab.drafters.none import NoDrafter
from decodelab.drafters.token_recycling import (EMPTY, TokenRecyclingConfig, TokenRecyclingDrafter, rank_prior,
                                                tree_template)
from decodelab.decoding.engine import decode
from decodelab.decoding.stop import StopCriteria
from decodelab.experiment.runner import eos_ids
from decodelab.decoding.logits import LogitsPipeline
from tests.helpers.decoding import assert_bad_value_is_named, assert_registered_with_yaml_defaults, encode_chat




def one_hot_logits(next_tokens: Sequence[int], vocab: int) -> torch.Tensor:
    logits = torch.zeros(len(next_tokens), vocab)
    logits[torch.arange(len(next_tokens)), torch.tensor(list(next_tokens))] = 10.0
    return logits


def paths_of(draft) -> List[tuple]:
    """Every node's root path as a token tuple."""
    return [tuple(draft.tokens[i] for i in tree.path_to(draft.parents, n)) for n in range(len(draft))]


# ---------------------------------------------------------------------------------------------------
# token_recycling: template, BFS fill, recycling
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk,depth,size", [(8, 5, 30), (8, 6, 80), (1, 4, 4), (3, 2, 12), (4, 3, 1)])
def test_template_is_a_tree_of_the_requested_size(topk, depth, size):
    paths = tree_template(topk, depth, size)
    assert len(paths) == size == len(set(paths))
    index = {p: i for i, p in enumerate(paths)}
    for i, p in enumerate(paths):
        assert 1 <= len(p) <= depth and all(0 <= r < topk for r in p)
        if len(p) > 1:
            assert index[p[:-1]] < i  # parent first
        if p[-1] > 0:
            assert p[:-1] + (p[-1] - 1,) in index  # the better-ranked sibling is there too
    # Highest prior scores: nothing left out beats anything chosen.
    worst = min(np.prod([rank_prior(r) for r in p]) for p in paths)
    for p in paths:
        if len(p) < depth:
            for r in range(topk):
                if p + (r,) not in index:
                    assert np.prod([rank_prior(x) for x in p + (r,)]) <= worst + 1e-12


def test_template_close_to_the_papers():
    counts = Counter(len(p) for p in tree_template(8, 6, 80))
    assert [counts[d] for d in range(1, 7)] == [8, 23, 25, 17, 6, 1]  # paper "2.2.2": 8/21/25/15/8/3


def tr_reference(matrix: np.ndarray, root: int, paths) -> List[tuple]:
    """Fill each template path by following the matrix from the root; drop a path through an empty entry."""
    out = []
    for path in paths:
        tokens, cur = [], root
        for r in path:
            cur = int(matrix[cur, r]) if cur >= 0 else EMPTY
            tokens.append(cur)
        if all(t >= 0 for t in tokens):
            out.append(tuple(tokens))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_tr_propose_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    cfg = TokenRecyclingConfig(topk=int(rng.integers(1, 5)), depth=int(rng.integers(1, 5)), tree_size=0)
    cfg.tree_size = int(rng.integers(1, sum(cfg.topk ** d for d in range(1, cfg.depth + 1)) + 1))
    cfg.tree_size = min(cfg.tree_size, 40)
    drafter = TokenRecyclingDrafter(cfg)
    vocab = 12
    drafter.matrix = rng.integers(0, vocab, size=(vocab, cfg.topk)).astype(np.int32)
    drafter.matrix[rng.random((vocab, cfg.topk)) < 0.2] = EMPTY  # some never-filled entries
    for root in range(vocab):
        draft = drafter.propose([3, root])
        expected = tr_reference(drafter.matrix, root, tree_template(cfg.topk, cfg.depth, cfg.tree_size))
        if not expected:
            assert draft.tokens == [] and draft.probs is None
            continue
        tree.check_parents(draft.parents)
        assert draft.probs is None and draft.forwards == 0
        assert paths_of(draft) == expected
        assert max(tree.depths(draft.parents)) <= cfg.depth and len(draft) <= cfg.tree_size


def test_tr_empty_matrix_drafts_nothing():
    drafter = TokenRecyclingDrafter(TokenRecyclingConfig())
    assert drafter.propose([1, 2, 3]).tokens == []
    drafter.observe([5], one_hot_logits([7], 50))
    assert drafter.propose([1, 2, 3]).tokens == []  # row 3 still empty
    assert drafter.propose([9, 999]).tokens == []  # beyond the vocabulary


def test_tr_observe_recycles_topk_rows():
    drafter = TokenRecyclingDrafter(TokenRecyclingConfig(topk=3, depth=2, tree_size=6))
    vocab = 10
    logits = torch.arange(3 * vocab, dtype=torch.float32).reshape(3, vocab)
    logits[0] = torch.tensor([0., 9, 8, 7, 0, 0, 0, 0, 0, 0])  # after token 4: 1, 2, 3
    logits[1] = torch.tensor([5., 0, 0, 0, 0, 0, 0, 0, 6, 7])  # after token 1: 9, 8, 0
    logits[2] = torch.tensor([0., 0, 0, 0, 0, 0, 0, 0, 0, 1])  # token 4 again: loses to its first row
    drafter.observe([4, 1, 4], logits)
    assert drafter.matrix.shape == (vocab, 3) and drafter.matrix.dtype == np.int32
    assert drafter.matrix[4].tolist() == [1, 2, 3]
    assert drafter.matrix[1].tolist() == [9, 8, 0]
    assert (drafter.matrix[[0, 2, 3, 5, 6, 7, 8, 9]] == EMPTY).all()
    draft = drafter.propose([0, 4])
    # template (3, 2, 6): (0), (1), (2), (0,0), (0,1), (1,0); rows 2 and 3 are empty.
    assert paths_of(draft) == [(1,), (2,), (3,), (1, 9), (1, 8)]
    assert draft.parents == [-1, -1, -1, 0, 0]
    drafter.reset([1, 2])  # the matrix outlives prompts
    assert drafter.matrix[4].tolist() == [1, 2, 3]
    # A later forward overwrites the row.
    drafter.observe([4], one_hot_logits([6], vocab))
    assert drafter.matrix[4, 0] == 6


def test_tr_matrix_sized_by_the_target(tiny_loaded):
    drafter = build_drafter(drafter_config({"name": "token_recycling"}), target=LMAdapter(tiny_loaded.model),
                            loaded=tiny_loaded)
    assert drafter.matrix.shape == (tiny_loaded.model.config.vocab_size, 8)


# ---------------------------------------------------------------------------------------------------
# lookahead: trie, pool, window
# ---------------------------------------------------------------------------------------------------
def test_trie_merges_shared_prefixes():
    trie = Trie()
    assert trie.insert([5, 6, 7]) == [0, 1, 2]
    assert trie.insert([5, 6, 8]) == [0, 1, 3]
    assert trie.insert([5, 9]) == [0, 4]
    assert trie.insert([6, 6]) == [5, 6]
    assert trie.insert([5, 6, 7]) == [0, 1, 2]
    assert trie.tokens == [5, 6, 7, 8, 9, 6, 6]
    assert trie.parents == [-1, 0, 1, 1, 0, -1, 5]
    tree.check_parents(trie.parents)


def test_pool_keeps_the_most_recent_guesses():
    pool = NgramPool(2)
    pool.add([1, 2, 3])
    pool.add([1, 4, 5])
    pool.add([1, 2, 3])  # seen again: to the front
    assert pool.get(1) == [(2, 3), (4, 5)]
    pool.add([1, 6, 7])
    assert pool.get(1) == [(6, 7), (2, 3)] and len(pool) == 2
    assert pool.get(9) == []


def test_lookahead_verification_branch_is_a_merged_trie():
    cfg = LookaheadConfig(window=2, ngram_size=3, guess_set_size=3)
    drafter = LookaheadDrafter(cfg)
    drafter.reset([10, 11, 12])
    for ngram in ([7, 1, 2], [7, 1, 3], [7, 4, 2], [8, 1, 2]):
        drafter.pool.add(ngram)
    draft = drafter.propose([5, 7])
    tree.check_parents(draft.parents)
    # Guesses (most recent first) first, then the lookahead branch: level 0 = the prompt's last 2 tokens.
    assert paths_of(draft) == [(4,), (4, 2), (1,), (1, 3), (1, 2), (11,), (11, 12)]
    assert len(set(paths_of(draft))) == len(draft)


def test_lookahead_window_fills_then_yields_ngrams():
    cfg = LookaheadConfig(window=3, ngram_size=3, guess_set_size=4)
    drafter = LookaheadDrafter(cfg)
    drafter.reset([1, 2, 3, 4, 5])
    vocab = 40
    assert drafter.levels == [[3, 4, 5]]
    # Step 1 (warm-up): only level 0, a chain from the root 9.
    draft = drafter.propose([1, 2, 3, 4, 5, 9])
    assert paths_of(draft) == [(3,), (3, 4), (3, 4, 5)]
    drafter.observe([9] + draft.tokens, one_hot_logits([0, 20, 21, 22], vocab))
    assert drafter.levels == [[3, 4, 5], [20, 21, 22]] and len(drafter.pool) == 0
    # Step 2: level 1 column j hangs under level 0 column j; predictions after level 1 close the n-grams.
    draft = drafter.propose([1, 2, 3, 4, 5, 9, 9])
    assert paths_of(draft) == [(3,), (3, 4), (3, 4, 5), (3, 20), (3, 4, 21), (3, 4, 5, 22)]
    drafter.observe([9] + draft.tokens, one_hot_logits([0, 0, 0, 0, 30, 31, 32], vocab))
    assert drafter.levels == [[20, 21, 22], [30, 31, 32]]
    assert drafter.pool.get(3) == [(20, 30)] and drafter.pool.get(4) == [(21, 31)]
    assert drafter.pool.get(5) == [(22, 32)]
    # Step 3 at root 4: the guess (21, 31) is drafted first.
    draft = drafter.propose([1, 4])
    assert paths_of(draft)[:2] == [(21,), (21, 31)]
    assert drafter.fused and draft.forwards == 0


def test_lookahead_ignores_logits_of_other_forwards():
    drafter = LookaheadDrafter(LookaheadConfig(window=2, ngram_size=2))
    drafter.reset([1, 2])
    drafter.observe([2], one_hot_logits([5], 10))  # a prefill: nothing pending
    draft = drafter.propose([1, 2])
    drafter.observe([3] + draft.tokens, one_hot_logits([5] * (len(draft) + 1), 10))  # not that draft
    assert drafter.levels == [[1, 2]] and len(drafter.pool) == 0


def test_lookahead_pool_from_prompt():
    drafter = LookaheadDrafter(LookaheadConfig(window=1, ngram_size=3, guess_set_size=2, pool_from_prompt=True))
    drafter.reset([1, 2, 3, 1, 2, 4, 1, 5, 6])
    assert drafter.pool.get(1) == [(5, 6), (2, 4)]
    assert drafter.pool.get(2) == [(4, 1), (3, 1)]
    assert paths_of(drafter.propose([2]))[:4] == [(4,), (4, 1), (3,), (3, 1)]


def _cached_keys(target: LMAdapter) -> list:
    """The keys the cache holds for its tokens, per layer, whichever cache it is."""
    if target.static is not None:
        return [target.static.keys[i, :, :len(target.tokens)].clone() for i in range(target.static.keys.shape[0])]
    return [layer.keys.clone() for layer in target.cache.layers]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_lookahead_own_forward_restores_the_cache(tiny_loaded, cache):
    """Without observe calls the drafter runs the lookahead branch itself and leaves the cache as it was."""
    target = LMAdapter(tiny_loaded.model, cache=cache)
    drafter = LookaheadDrafter(LookaheadConfig(window=3, ngram_size=3), target=target)
    prompt = list(range(40, 60))
    target.prefill(prompt)
    drafter.reset(prompt)
    context = prompt + [61]
    first = drafter.propose(context)  # fused: waits for observe
    assert drafter.fused and first.forwards == 0 and len(first) == 3
    keys = _cached_keys(target)
    tokens, forwards = list(target.tokens), target.forwards
    second = drafter.propose(context)  # no observe came: run it ourselves
    assert not drafter.fused and second.forwards == 1 and target.forwards == forwards + 1
    assert target.tokens == tokens
    assert all(torch.equal(a, b) for a, b in zip(keys, _cached_keys(target)))
    assert len(drafter.levels) == 2
    # Its predictions are the target's greedy tokens after each level-0 path.
    probe = LMAdapter(tiny_loaded.model)
    for j in range(3):
        logits = probe.prefill(context + drafter.levels[0][:j + 1])
        assert drafter.levels[1][j] == int(logits.argmax())


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------
def test_registered_with_yaml_defaults():
    for name, schema in [("token_recycling", TokenRecyclingConfig), ("lookahead", LookaheadConfig)]:
        assert_registered_with_yaml_defaults(name, schema)


@pytest.mark.parametrize("drafter,override,key", [
    ("token_recycling", "drafter.topk=0", "drafter.topk"),
    ("token_recycling", "drafter.depth=0", "drafter.depth"),
    ("token_recycling", "drafter.tree_size=0", "drafter.tree_size"),
    ("token_recycling", "drafter.tree_size=20", "drafter.tree_size"),  # with topk=2, depth=3: at most 14
    ("lookahead", "drafter.window=0", "drafter.window"),
    ("lookahead", "drafter.ngram_size=1", "drafter.ngram_size"),
    ("lookahead", "drafter.guess_set_size=0", "drafter.guess_set_size"),
])
def test_bad_values_name_the_key(drafter, override, key):
    extra = ["drafter.topk=2", "drafter.depth=3"] if key == "drafter.tree_size" and "20" in override else []
    assert_bad_value_is_named(drafter, override, key, extra)


# ---------------------------------------------------------------------------------------------------
# the engine on the tiny model
# ---------------------------------------------------------------------------------------------------
TINY_PROMPTS = [
    "abcabcabcabcabcabcabcabcabcabc",
    "Copy exactly: alpha beta gamma delta. Copy exactly: alpha beta gamma delta. Copy exactly: alpha beta",
    "Summarize: the quick brown fox jumps over the lazy dog, again and again, near the river bank.",
]
# (name, extra config, feed observe): lookahead without observe runs its own lookahead forwards.
TREE_DRAFTERS = [("token_recycling", {}, True), ("lookahead", {}, True), ("lookahead", {}, False),
                 ("lookahead", {"ngram_size": 2, "window": 3, "pool_from_prompt": True}, True)]


def _decode(loaded, target, ids, drafter, max_new_tokens, strategy: Optional[StrategyConfig] = None, seed=0):
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    target.reset()
    return decode(target, ids, pipeline=LogitsPipeline(strategy or StrategyConfig()), drafter=drafter,
                  stop=stop, generator=torch.Generator().manual_seed(seed))


def _build(name, extra, loaded, target):
    return build_drafter(drafter_config({"name": name, **extra}), target=target, loaded=loaded)


@pytest.mark.parametrize("name,extra,feed", TREE_DRAFTERS)
def test_tiny_greedy_identical_to_ar(tiny_loaded, name, extra, feed):
    target = LMAdapter(tiny_loaded.model)
    drafter = _build(name, extra, tiny_loaded, target)
    accepted = 0
    for text in TINY_PROMPTS:  # one drafter for all prompts (token_recycling's matrix carries over)
        ids = encode_chat(tiny_loaded.tokenizer, text)
        reference = _decode(tiny_loaded, target, ids, NoDrafter(DrafterConfig()), 40)
        ours = _decode(tiny_loaded, target, ids, drafter, 40)
        assert ours.tokens == reference.tokens, text
        assert ours.stop_reason == reference.stop_reason
        assert sum(s.accepted + s.bonus for s in ours.steps) + 1 >= len(ours.tokens)
        # Lookahead's own lookahead forwards are target forwards too, and reported as draft forwards.
        assert ours.target_forwards == len(ours.steps) + 1 + ours.draft_forwards
        assert ours.draft_forwards == 0  # lookahead's window is fused into the verification forward
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0
    if name == "lookahead":
        assert drafter.fused


@pytest.mark.parametrize("name,extra,feed", TREE_DRAFTERS[:3])
def test_tiny_accepts_on_repetitive_prompt(tiny_loaded, name, extra, feed):
    target = LMAdapter(tiny_loaded.model)
    drafter = _build(name, extra, tiny_loaded, target)
    ids = encode_chat(tiny_loaded.tokenizer, TINY_PROMPTS[0])
    gen = _decode(tiny_loaded, target, ids, drafter, 48)
    assert any(s.accepted > 0 for s in gen.steps)
    assert len(gen.steps) < len(gen.tokens) - 1  # fewer verification steps than plain decoding


@pytest.mark.parametrize("name,extra,feed", TREE_DRAFTERS[:3])
def test_tiny_sampling_reproducible(tiny_loaded, name, extra, feed):
    """Same seeds, same drafts, same output (the drafters never touch the generator). The random model's
    distributions are too flat at temperature 1 for acceptance to be expected; tree sampling must still run."""
    strategy = StrategyConfig(do_sample=True, temperature=1.0)
    outputs = []
    for _ in range(2):
        target = LMAdapter(tiny_loaded.model)
        drafter = _build(name, extra, tiny_loaded, target)
        runs = [_decode(tiny_loaded, target, encode_chat(tiny_loaded.tokenizer, text), drafter, 32, strategy, seed)
                for seed, text in enumerate(TINY_PROMPTS)]
        outputs.append([(g.tokens, [(s.drafted, s.accepted) for s in g.steps]) for g in runs])
    assert outputs[0] == outputs[1]
    assert sum(s[0] for tokens, steps in outputs[0] for s in steps) > 0


# ---------------------------------------------------------------------------------------------------
# SmolLM2 (slow)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_summarization_identical_to_ar(smollm2_loaded, capsys):
    from decodelab.config import TaskConfig
    from decodelab.tasks import load_task

    prompts = load_task(TaskConfig(name="specbench-mini", source="specbench_mini",
                                   categories=["summarization"], limit=2))
    assert len(prompts) == 2
    target = LMAdapter(smollm2_loaded.model)
    ids = [encode_chat(smollm2_loaded.tokenizer, p.turns[0]) for p in prompts]
    reference = [_decode(smollm2_loaded, target, x, NoDrafter(DrafterConfig()), 48) for x in ids]
    report = []
    for name, extra, feed in TREE_DRAFTERS[:3]:
        drafter = _build(name, extra, smollm2_loaded, target)
        steps, forwards, wall = [], 0, 0.0
        for x, ref in zip(ids, reference):
            gen = _decode(smollm2_loaded, target, x, drafter, 48)
            assert gen.tokens == ref.tokens, name
            steps += gen.steps
            forwards += gen.target_forwards
            wall += gen.wall_s
        tau = sum(s.accepted + s.bonus for s in steps) / len(steps)
        drafted = sum(s.drafted for s in steps) / len(steps)
        mode = " (own lookahead forwards)" if name == "lookahead" and not drafter.fused else ""
        report.append(f"{name}{mode}: mean accepted per step "
                      f"{tau - 1:.2f} (tau {tau:.2f}), drafted/step {drafted:.1f}, steps {len(steps)}, "
                      f"target forwards {forwards}, wall {wall:.2f}s vs AR {sum(r.wall_s for r in reference):.2f}s")
    with capsys.disabled():
        print("\n" + "\n".join(report))

"""Token trees: shape helpers, the one-forward tree pass against sequential paths, cache compaction, and
chains written as trees verifying exactly like chains."""

from __future__ import annotations

import pytest
import torch

from decodelab.decoding import tree
from decodelab.decoding.lm import LMAdapter
from decodelab.config import StrategyConfig
from decodelab.decoding.types import Draft
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.verify import verify

# root -> 0 -> {1, 2};  root -> 3 -> 4 -> 5;  root -> 6
PARENTS = [-1, 0, 0, -1, 3, 4, -1]
TOKENS = [30, 40, 41, 50, 51, 52, 60, 70]  # the root first, then one token per node
PROMPT = list(range(5, 29))


# Tiny models are latency-bound: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_qwen2():
    from decodelab.experiment.compose import compose
    from decodelab.experiment.compose import to_run_config
    from decodelab.models.loading import load_model

    run = to_run_config(compose(["model=tiny-random", "model.architecture=qwen2", "tracking=none", "output_dir=unused"]))
    return load_model(run.model, run.backend)


@pytest.fixture(params=["sdpa", "eager"])
def attention(request, tiny_loaded):
    """Run a test under each attention implementation that takes a 4-D mask (restored after)."""
    before = tiny_loaded.model.config._attn_implementation
    tiny_loaded.model.config._attn_implementation = request.param
    yield request.param
    tiny_loaded.model.config._attn_implementation = before


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def test_shape_helpers():
    assert tree.depths(PARENTS) == [1, 2, 2, 1, 2, 3, 1]
    assert tree.children(PARENTS) == {-1: [0, 3, 6], 0: [1, 2], 1: [], 2: [], 3: [4], 4: [5], 5: [], 6: []}
    assert tree.path_to(PARENTS, 5) == [3, 4, 5] and tree.path_to(PARENTS, -1) == []
    assert tree.leaves(PARENTS) == [1, 2, 5, 6]
    assert tree.paths(PARENTS) == [[0, 1], [0, 2], [3, 4, 5], [6]]
    assert tree.chain_parents(3) == [-1, 0, 1] and tree.chain_parents(0) == []
    assert tree.position_ids(PARENTS, 10).tolist() == [[10, 11, 12, 12, 11, 12, 13, 11]]


def test_attention_mask_is_cache_plus_ancestry():
    mask = tree.attention_mask(PARENTS, past=3, dtype=torch.float32)
    assert mask.shape == (1, 1, 8, 11)
    allowed = (mask[0, 0] == 0)
    assert allowed[:, :3].all()  # every row sees the whole cache
    for node in range(len(PARENTS)):
        seen = {0} | {tree.row(n) for n in tree.path_to(PARENTS, node)}
        assert set(torch.nonzero(allowed[tree.row(node), 3:]).flatten().tolist()) == seen
    assert (mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()


def test_bad_parents_rejected():
    with pytest.raises(ValueError):
        tree.check_parents([-1, 1])  # a node cannot be its own parent
    with pytest.raises(ValueError):
        tree.check_parents([0])  # a parent must come first
    with pytest.raises(ValueError):
        tree.check_parents([-2])


# ------------------------------------------------------------------------------------------------
# the tree forward and cache compaction on the tiny model
# ------------------------------------------------------------------------------------------------

def _sequential_logits(model, prompt, path_tokens):
    adapter = LMAdapter(model)
    adapter.prefill(prompt)
    return adapter.forward(path_tokens)[-1]


def _check_tree_forward(model):
    adapter = LMAdapter(model)
    adapter.prefill(PROMPT)
    logits = adapter.forward_tree(TOKENS, PARENTS)
    assert logits.shape == (len(TOKENS), model.config.vocab_size)
    assert adapter.tokens == PROMPT + TOKENS
    for node in range(tree.ROOT, len(PARENTS)):
        path = [TOKENS[0]] + [TOKENS[tree.row(n)] for n in tree.path_to(PARENTS, node)]
        expected = _sequential_logits(model, PROMPT, path)
        torch.testing.assert_close(logits[tree.row(node)], expected, atol=1e-4, rtol=0)


def test_forward_tree_matches_each_path_sequentially(tiny_loaded, attention):
    _check_tree_forward(tiny_loaded.model)


def test_forward_tree_qwen2(tiny_qwen2):
    _check_tree_forward(tiny_qwen2.model)


@pytest.mark.parametrize("accepted", [[3, 4, 5], [0, 2], [6], []])
def test_keep_then_continue_equals_fresh_prefill(tiny_loaded, attention, accepted):
    adapter = LMAdapter(tiny_loaded.model)
    adapter.prefill(PROMPT)
    cached = len(adapter.tokens)
    adapter.forward_tree(TOKENS, PARENTS)
    adapter.keep(list(range(cached + 1)) + [cached + 1 + n for n in accepted])
    sequence = PROMPT + [TOKENS[0]] + [TOKENS[tree.row(n)] for n in accepted]
    assert adapter.tokens == sequence
    nxt = [7, 8, 9]
    continued = adapter.forward(nxt)
    reference = LMAdapter(tiny_loaded.model).prefill(sequence + nxt)
    torch.testing.assert_close(continued[-1], reference, atol=1e-4, rtol=0)
    # and a second tree on top of the compacted cache is still exact (row 2: root 11 -> node 1 = 13)
    second = adapter.forward_tree([11, 12, 13], [-1, -1])
    torch.testing.assert_close(second[2], _sequential_logits(tiny_loaded.model, sequence + nxt, [11, 13]),
                               atol=1e-4, rtol=0)


def test_keep_rejects_unordered_positions(tiny_loaded):
    adapter = LMAdapter(tiny_loaded.model)
    adapter.prefill(PROMPT)
    with pytest.raises(ValueError):
        adapter.keep([0, 2, 1])
    with pytest.raises(ValueError):
        adapter.keep([0, len(adapter.tokens)])


def test_forward_tree_refuses_attention_without_masks(tiny_loaded):
    before = tiny_loaded.model.config._attn_implementation
    tiny_loaded.model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(NotImplementedError, match="attn_implementation"):
            LMAdapter(tiny_loaded.model).forward_tree([1, 2], [-1])
    finally:
        tiny_loaded.model.config._attn_implementation = before


# ------------------------------------------------------------------------------------------------
# a chain written as a tree verifies exactly like the chain
# ------------------------------------------------------------------------------------------------

STRATEGIES = {
    "greedy": StrategyConfig(),
    "greedy_penalty": StrategyConfig(repetition_penalty=1.3),
    "sample": StrategyConfig(name="s", do_sample=True, temperature=0.9, top_p=0.95),
    "sample_penalty": StrategyConfig(name="s", do_sample=True, temperature=1.2, top_k=6, repetition_penalty=1.2),
    "typical": StrategyConfig(name="t", do_sample=True, temperature=0.7, acceptance="typical"),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("with_probs", [False, True])
def test_chain_as_tree_verifies_like_chain(name, with_probs):
    pipeline = LogitsPipeline(STRATEGIES[name])
    vocab, k = 12, 4
    lengths = set()
    for trial in range(40):
        g = torch.Generator().manual_seed(trial)
        logits = torch.randn(k + 1, vocab, generator=g) * 2
        probs = torch.softmax(torch.randn(k, vocab, generator=g) * 2, dim=-1) if with_probs else None
        context = torch.randint(vocab, (6,), generator=g).tolist()
        if trial % 2:  # drafts that are mostly the target's argmax, so long prefixes get accepted
            tokens = logits[:k].argmax(dim=-1).tolist()
            tokens[trial % k] = int(torch.randint(vocab, (), generator=g))
        else:
            tokens = torch.randint(vocab, (k,), generator=g).tolist()
        chain = verify(Draft(tokens=tokens, probs=probs), logits, pipeline, torch.Generator().manual_seed(trial),
                       context)
        as_tree = verify(Draft(tokens=tokens, probs=probs, parents=tree.chain_parents(k)), logits, pipeline,
                         torch.Generator().manual_seed(trial), context)
        assert as_tree == chain, (trial, tokens)
        lengths.add(len(chain.accepted))
    assert 0 in lengths and max(lengths) >= 2  # rejections and long accepted prefixes both happened

"""The decode loop against transformers.generate: greedy must be identical token for token."""

from __future__ import annotations

import pytest
import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.config import StrategyConfig
from decodelab.config import DrafterConfig
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.drafters.none import NoDrafter
from decodelab.decoding.engine import decode
from decodelab.decoding.stop import StopCriteria
from decodelab.experiment.runner import eos_ids
from decodelab.decoding.logits import LogitsPipeline
from tests.helpers.decoding import encode_chat

# Tiny models are latency-bound: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Summarize: the quick brown fox jumps over the lazy dog, again and again, near the river bank.",
    "What is 12 times 7? Explain step by step.",
    "Translate to French: I would like a cup of coffee, please.",
]




def _ours(loaded, ids, max_new_tokens, strategy=None, seed=0):
    pipeline = LogitsPipeline(strategy or StrategyConfig())
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    return decode(LMAdapter(loaded.model), ids, pipeline=pipeline, drafter=NoDrafter(DrafterConfig()), stop=stop,
                  generator=gen)


def _reference(loaded, ids, max_new_tokens):
    input_ids = torch.tensor([ids])
    out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=eos_ids(loaded),
                                pad_token_id=eos_ids(loaded)[0])
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_matches_generate_tiny(tiny_loaded, text):
    ids = encode_chat(tiny_loaded.tokenizer, text)
    ours = _ours(tiny_loaded, ids, 40)
    assert ours.tokens == _reference(tiny_loaded, ids, 40)
    assert len(ours.tokens) == 40 or ours.stop_reason == "eos"


@pytest.mark.slow
@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_matches_generate_smollm2(smollm2_loaded, text):
    ids = encode_chat(smollm2_loaded.tokenizer, text)
    ours = _ours(smollm2_loaded, ids, 48)
    assert ours.tokens == _reference(smollm2_loaded, ids, 48)
    assert ours.ttft_s > 0 and ours.wall_s >= ours.ttft_s


def test_fixed_seed_reproduces_sample(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[0])
    strategy = StrategyConfig(name="sample", do_sample=True, temperature=1.0, top_p=0.95)
    first = _ours(tiny_loaded, ids, 24, strategy, seed=7).tokens
    assert _ours(tiny_loaded, ids, 24, strategy, seed=7).tokens == first
    assert _ours(tiny_loaded, ids, 24, strategy, seed=8).tokens != first


def test_max_new_tokens_and_steps(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[1])
    gen = _ours(tiny_loaded, ids, 5)
    assert len(gen.tokens) <= 5
    # first token comes from prefill; each later token from one single-token step.
    assert len(gen.steps) == len(gen.tokens) - 1
    assert gen.target_forwards == len(gen.tokens)


def test_stop_string_cuts_generation(tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    ids = encode_chat(tokenizer, PROMPTS[2])
    full = _ours(tiny_loaded, ids, 30).tokens
    text = tokenizer.decode(full, skip_special_tokens=True)
    stop_at = text[3:5]
    stop = StopCriteria(tokenizer, eos_ids(tiny_loaded), [stop_at], 30)
    gen = decode(LMAdapter(tiny_loaded.model), ids, pipeline=LogitsPipeline(StrategyConfig()),
                 drafter=NoDrafter(DrafterConfig()), stop=stop, generator=torch.Generator().manual_seed(0))
    assert gen.stop_reason == "stop_string"
    assert stop_at in tokenizer.decode(gen.tokens, skip_special_tokens=True)
    assert gen.tokens == full[: len(gen.tokens)] and len(gen.tokens) < len(full)


def test_prefill_reuses_cached_prefix(tiny_loaded):
    adapter = LMAdapter(tiny_loaded.model)
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[0])
    fresh = adapter.prefill(ids)
    adapter.forward([5, 6, 7])
    again = adapter.prefill(ids + [9])  # shares the prompt with the cache, diverges after it
    assert len(adapter.tokens) == len(ids) + 1
    reference = LMAdapter(tiny_loaded.model).prefill(ids + [9])
    torch.testing.assert_close(again, reference, rtol=1e-4, atol=1e-4)
    assert fresh.shape == again.shape


# ------------------------------------------------------------------------------------------------
# speculative decoding with a test-only oracle drafter (chains and token trees)
# ------------------------------------------------------------------------------------------------

class OracleDrafter(Drafter):
    """Proposes the next ``k`` tokens of a precomputed greedy output; not registered (no ``name``).

    ``mode``: "mistakes" corrupts one token of every third proposal, "perfect" never errs, "garbage"
    proposes only wrong tokens. ``shape="tree"`` puts a wrong sibling beside every right token (the
    right one first or second by depth, and the wrong ones get a child of their own), so the accepted
    path has to be found among branches.
    """

    def __init__(self, prompt, reference, *, k=4, shape="chain", mode="mistakes", vocab=320):
        self.prompt, self.reference, self.k = prompt, reference, k
        self.shape, self.mode, self.vocab = shape, mode, vocab
        self.calls = 0

    def propose(self, context):
        done = len(context) - len(self.prompt)
        truth = list(self.reference[done: done + self.k])
        self.calls += 1
        if self.mode == "garbage":
            truth = [(t + 1) % self.vocab for t in truth]
        elif self.mode == "mistakes" and truth and self.calls % 3 == 0:
            i = self.calls % len(truth)
            truth[i] = (truth[i] + 7) % self.vocab
        if self.shape == "chain":
            return Draft(tokens=truth)
        return self._tree(truth)

    def _tree(self, truth):
        tokens, parents, parent = [], [], -1
        for depth, right in enumerate(truth):
            wrong = (right + 1 + depth) % self.vocab
            order = [wrong, right] if depth % 2 == 0 else [right, wrong]
            for token in order:
                tokens.append(token)
                parents.append(parent)
            right_node = len(tokens) - 1 if depth % 2 == 0 else len(tokens) - 2
            wrong_node = len(tokens) - 2 if depth % 2 == 0 else len(tokens) - 1
            tokens.append((wrong + 3) % self.vocab)  # a dead branch below the wrong sibling
            parents.append(wrong_node)
            parent = right_node
        return Draft(tokens=tokens, parents=parents)


def _decode_with(loaded, ids, drafter, max_new_tokens=40, strategy=None, seed=0):
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    return decode(LMAdapter(loaded.model), ids, pipeline=LogitsPipeline(strategy or StrategyConfig()), drafter=drafter,
                  stop=stop, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def greedy_reference(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[0])
    return ids, _ours(tiny_loaded, ids, 40).tokens


@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("mode", ["mistakes", "perfect", "garbage"])
def test_speculative_greedy_identical_to_autoregressive(tiny_loaded, greedy_reference, shape, mode):
    ids, reference = greedy_reference
    drafter = OracleDrafter(ids, reference, shape=shape, mode=mode)
    gen = _decode_with(tiny_loaded, ids, drafter)
    assert gen.tokens == reference and not gen.lossy
    assert gen.target_forwards == len(gen.steps) + 1  # prefill + one forward per step
    assert all(s.bonus == 1 for s in gen.steps)
    # The tree has a right node, a wrong sibling and a dead branch per level (3 nodes); the last step's tree
    # may be cut to the token budget below its dead branch (3 * depth - 1 nodes): either way depth = (n + 1) // 3.
    right_per_step = [(s.drafted + 1) // 3 if shape == "tree" else s.drafted for s in gen.steps]
    accepted = [s.accepted for s in gen.steps]
    if mode == "perfect":
        assert accepted == right_per_step and sum(accepted) > 0
    elif mode == "garbage":
        assert sum(accepted) == 0 and len(gen.steps) == len(reference) - 1
    else:
        assert 0 < sum(accepted) < sum(right_per_step)
    # every committed token is accounted for: the first from prefill, then accepted + bonus per step
    assert 1 + sum(s.accepted + s.bonus for s in gen.steps) >= len(gen.tokens)


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_speculative_sampling_reproducible(tiny_loaded, greedy_reference, shape):
    ids, reference = greedy_reference
    strategy = StrategyConfig(name="sample", do_sample=True, temperature=0.8, top_p=0.95)
    runs = [_decode_with(tiny_loaded, ids, OracleDrafter(ids, reference, shape=shape), 32, strategy, seed=s).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_chain_as_tree_decodes_like_chain(tiny_loaded, greedy_reference):
    """Same draws, same verdicts: a chain sent through forward_tree/keep must give the chain's output."""

    class AsTree(OracleDrafter):
        def propose(self, context):
            draft = super().propose(context)
            return Draft(tokens=draft.tokens, parents=list(range(-1, len(draft) - 1)))

    ids, reference = greedy_reference
    strategy = StrategyConfig(name="sample", do_sample=True, temperature=1.0, top_k=20, repetition_penalty=1.1)
    chain = _decode_with(tiny_loaded, ids, OracleDrafter(ids, reference), 32, strategy, seed=3)
    tree = _decode_with(tiny_loaded, ids, AsTree(ids, reference), 32, strategy, seed=3)
    assert tree.tokens == chain.tokens
    assert [(s.drafted, s.accepted) for s in tree.steps] == [(s.drafted, s.accepted) for s in chain.steps]


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_typical_acceptance_marks_generation_lossy(tiny_loaded, greedy_reference, shape):
    ids, reference = greedy_reference
    strategy = StrategyConfig(name="typical", do_sample=True, temperature=0.8, acceptance="typical")
    gen = _decode_with(tiny_loaded, ids, OracleDrafter(ids, reference, shape=shape), 24, strategy, seed=1)
    assert gen.lossy
    again = _decode_with(tiny_loaded, ids, OracleDrafter(ids, reference, shape=shape), 24, strategy, seed=1)
    assert again.tokens == gen.tokens
    plain = _decode_with(tiny_loaded, ids, NoDrafter(DrafterConfig()), 24, strategy, seed=1)
    assert not plain.lossy  # no draft, no typical acceptance

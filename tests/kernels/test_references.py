"""The torch references are the torch path: what the kernel tests compare against is what ``backend.kernels=torch``
runs, draw for draw. No Triton needed: the references and :class:`ReferenceKernels` are plain torch."""

from __future__ import annotations

import pytest
import torch

from decodelab.config import StrategyConfig
from decodelab.decoding.logits import LogitsPipeline, exponential_noise
from decodelab.decoding.verify import speculative_sampling, tree_speculative_sampling
from decodelab.kernels.logits_reference import race_sample, reference_probs
from decodelab.kernels.provider import ReferenceKernels
from decodelab.kernels.rejection_reference import chain_reference, tree_reference
from tests.helpers.decoding import encode_chat
from tests.helpers.drafters import decode_with, draft_model_node, make_drafter

pytestmark = pytest.mark.usefixtures("one_thread")

FILTERS = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.05),
]


def _strategy(**filters) -> StrategyConfig:
    return StrategyConfig(name="s", do_sample=True, **filters)


@pytest.mark.parametrize("filters", FILTERS, ids=str)
def test_reference_probs_are_the_pipelines(filters):
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(reference_probs(logits, **filters), LogitsPipeline(_strategy(**filters)).probs(logits))


@pytest.mark.parametrize("shape", [(1000,), (4, 321)])
def test_the_race_is_torch_multinomial(shape):
    """exponential_noise + argmax(p / noise) draws what torch.multinomial draws from the same generator state
    (a torch upgrade that changes multinomial's algorithm fails here, not in a sampled-decode comparison)."""
    for seed in range(20):
        probs = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).softmax(-1)
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        noise = exponential_noise(probs.shape, torch.Generator().manual_seed(seed), probs.device)
        assert torch.equal(race_sample(probs, noise), expected)


def _probs(g: torch.Generator, *shape: int) -> torch.Tensor:
    return reference_probs(torch.randn(*shape, generator=g) * 2, top_k=shape[-1] // 2)


@pytest.mark.parametrize("with_q", [True, False])
def test_chain_reference_is_speculative_sampling(with_q):
    """Uniforms, then noise, from one generator: the reference's verdict is the verifier's, seed for seed."""
    vocab, k = 20, 4
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        p, q = _probs(g, k + 1, vocab), (_probs(g, k, vocab) if with_q else None)
        tokens = torch.multinomial(q if with_q else p[:k], 1, generator=g).flatten().tolist()
        verdict = speculative_sampling(tokens, p, q, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        u, noise = torch.rand(1, k, generator=g), exponential_noise((1, vocab), g, p.device)
        out = chain_reference(torch.tensor([tokens]), p[None], None if q is None else q[None], u, noise, greedy=False)
        n = int(out.num_accepted[0])
        assert out.tokens[0, :n + 1].tolist() == verdict.accepted + [verdict.bonus]


@pytest.mark.parametrize("with_q", [True, False])
def test_tree_reference_is_tree_speculative_sampling(with_q):
    vocab, parents = 12, [-1, -1, 0, 0, 2, -1]
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        p, q = _probs(g, len(parents) + 1, vocab), (_probs(g, len(parents), vocab) if with_q else None)
        tokens = torch.randint(0, vocab, (len(parents),), generator=g).tolist()
        verdict = tree_speculative_sampling(tokens, parents, p, q, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        u, noise = torch.rand(1, len(parents), generator=g), exponential_noise((1, vocab), g, p.device)
        out = tree_reference(torch.tensor([tokens]), torch.tensor([parents]), p[None],
                             None if q is None else q[None], u, noise, greedy=False)
        n = int(out.num_accepted[0])
        assert out.nodes[0, :n].tolist() == verdict.nodes and int(out.bonus[0]) == verdict.bonus


STRATEGIES = {
    "greedy": StrategyConfig(),
    "sample": _strategy(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02),
    "penalty": _strategy(temperature=1.2, top_p=0.95, repetition_penalty=1.3),
}
DRAFTERS = {
    "none": None,
    "prompt_lookup": {"name": "prompt_lookup", "num_speculative_tokens": 3, "max_ngram_size": 2},
    "draft_tree": draft_model_node({"init_seed": 1}, branching=2, length={"k": 3}),
}


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_engine_on_reference_kernels_is_the_torch_path(tiny_loaded, strategy, drafter):
    """The provider seam changes no token: every draw the core makes for a provider is the torch path's."""
    from decodelab.drafters.none import NoDrafter
    from decodelab.config import DrafterConfig

    ids = encode_chat(tiny_loaded.tokenizer, "Summarize: the quick brown fox jumps over the lazy dog, twice.")
    outputs = []
    for kernels in (None, ReferenceKernels()):
        pipeline = LogitsPipeline(STRATEGIES[strategy], kernels=kernels)
        node = DRAFTERS[drafter]
        proposer = NoDrafter(DrafterConfig()) if node is None else make_drafter(tiny_loaded, node, pipeline)
        outputs.append(decode_with(tiny_loaded, ids, proposer, max_new_tokens=16, pipeline=pipeline).tokens)
    assert outputs[0] == outputs[1] and len(outputs[0]) > 1


def test_a_pipeline_with_kernels_refuses_what_they_do_not_cover():
    with pytest.raises(ValueError, match="strategy.typical_p"):
        LogitsPipeline(_strategy(typical_p=0.9), kernels=ReferenceKernels())
    with pytest.raises(ValueError, match="strategy.acceptance"):
        LogitsPipeline(_strategy(acceptance="typical"), kernels=ReferenceKernels())
    LogitsPipeline(StrategyConfig(typical_p=0.9), kernels=ReferenceKernels())  # greedy: warpers never run

"""The logits pipeline against transformers' own processors, plus greedy, seeding and sampling checks.

Matching transformers exactly (same -inf mask, same finite values) is what lets a decodelab run be
compared with ``generate``; the same pipeline feeding both sides of verification is what keeps
speculative sampling lossless.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from decodelab.config import StrategyConfig
from decodelab.decoding.logits import ORDER, ChainContext, LogitsPipeline

# Tiny models are latency-bound: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1000
ROWS = 8
SEEDS = (0, 1, 2)

# transformers class -> our step name (also StrategyConfig field name)
HF_NAMES: Dict[str, str] = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "TemperatureLogitsWarper": "temperature",
    "TopKLogitsWarper": "top_k",
    "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff",
}




def make_logits(seed: int, ties: bool, rows: int = ROWS, vocab: int = VOCAB) -> torch.Tensor:
    """Rows from flat to very peaked (filters bite differently), optionally on a coarse grid (many ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.linspace(0.5, 8.0, rows)[:, None]
    if ties:
        x = (x * 2).round() / 2
        x[:, :3] = x.max(dim=-1, keepdim=True).values  # ties at the very top too
    return x


def make_context(seed: int, rows: int = ROWS, length: int = 40, vocab: int = VOCAB) -> torch.Tensor:
    """Per-row ids with repeats (a small id range) and one id past the LM head, which must be ignored."""
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, vocab // 4, (rows, length), generator=g)
    ids[:, 0] = vocab + 3
    return ids


def sampling_cfg(**overrides) -> StrategyConfig:
    return replace(StrategyConfig(), name="sample", do_sample=True, **overrides)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), "different -inf masks"
    finite = torch.isfinite(theirs)
    assert torch.isfinite(ours).eq(finite).all()
    torch.testing.assert_close(ours[finite], theirs[finite], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- one filter at a time

SINGLE_CASES = (
    [("temperature", v, lambda v: TemperatureLogitsWarper(v)) for v in (0.3, 0.7, 1.5, 2.0)]
    + [("top_k", v, lambda v: TopKLogitsWarper(v)) for v in (1, 3, 50, 999, 1000, 5000)]
    + [("top_p", v, lambda v: TopPLogitsWarper(v)) for v in (1e-6, 0.1, 0.5, 0.9, 0.95, 0.999)]
    + [("min_p", v, lambda v: MinPLogitsWarper(v)) for v in (0.01, 0.05, 0.2, 0.5, 1.0)]
    + [("typical_p", v, lambda v: TypicalLogitsWarper(v)) for v in (1e-3, 0.2, 0.5, 0.9, 0.99)]
    + [("epsilon_cutoff", v, lambda v: EpsilonLogitsWarper(v)) for v in (1e-4, 1e-3, 3e-3, 0.1, 0.9)]
    + [("eta_cutoff", v, lambda v: EtaLogitsWarper(v)) for v in (1e-4, 1e-3, 4e-3, 0.1, 0.5)]
)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,value,make_hf", SINGLE_CASES, ids=[f"{n}={v}" for n, v, _ in SINGLE_CASES])
def test_single_filter_matches_transformers(name, value, make_hf, seed, ties):
    x = make_logits(seed, ties)
    pipe = LogitsPipeline(sampling_cfg(**{name: value}))
    assert pipe.steps == (name,)
    assert_same(pipe.process(x), make_hf(value)(None, x.clone()))


@pytest.mark.parametrize("penalty", [0.5, 0.9, 1.2, 2.0])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("do_sample", [True, False], ids=["sample", "greedy"])
def test_repetition_penalty_matches_transformers(penalty, seed, do_sample):
    x, ctx = make_logits(seed, ties=False), make_context(seed)
    cfg = replace(StrategyConfig(), do_sample=do_sample, repetition_penalty=penalty)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    pipe = LogitsPipeline(cfg)
    # one context per row (2-D tensor), and one shared context (1-D)
    assert_same(pipe.process(x, ctx), hf(ctx, x.clone()))
    assert_same(pipe.process(x, ctx[0]), hf(ctx[0].expand(ROWS, -1), x.clone()))


def test_repetition_penalty_ragged_and_chain_contexts():
    """Verification rows: row i sees prefix + draft[:i]; ChainContext, a list of rows and transformers agree."""
    x = make_logits(3, ties=False)
    prefix = make_context(3)[0]
    draft = torch.tensor([7, 7, 900, 12, 5, 999, 3])  # ROWS - 1 draft tokens, with a repeat and fresh ids
    rows = [torch.cat([prefix, draft[:i]]) for i in range(ROWS)]
    hf = RepetitionPenaltyLogitsProcessor(1.3)
    expected = torch.cat([hf(r[None], x[i:i + 1].clone()) for i, r in enumerate(rows)])
    pipe = LogitsPipeline(sampling_cfg(repetition_penalty=1.3))
    assert_same(pipe.process(x, rows), expected)
    assert_same(pipe.process(x, ChainContext(prefix, draft)), expected)
    # fewer rows than draft + 1 (a shorter verified window) and a single row are fine too
    assert_same(pipe.process(x[:3], ChainContext(prefix, draft)), expected[:3])
    assert_same(pipe.process(x[0], ChainContext(prefix, draft)), expected[0])


def test_repetition_penalty_needs_context():
    pipe = LogitsPipeline(sampling_cfg(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="context_ids"):
        pipe.process(make_logits(0, ties=False))
    with pytest.raises(ValueError, match="rows"):
        pipe.process(make_logits(0, ties=False), [torch.tensor([1, 2])])


# ---------------------------------------------------------------------- the whole pipeline, in generate's order

@pytest.fixture(scope="module")
def tiny_model():
    """Only used to ask transformers which processors generate() would build, and in which order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1))


def hf_processors(model, cfg: StrategyConfig, prompt_len: int) -> LogitsProcessorList:
    gen = GenerationConfig(
        do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        min_p=cfg.min_p or None, typical_p=cfg.typical_p, epsilon_cutoff=cfg.epsilon_cutoff,
        eta_cutoff=cfg.eta_cutoff, repetition_penalty=cfg.repetition_penalty,
    )
    return model._get_logits_processor(generation_config=gen, input_ids_seq_length=prompt_len, device="cpu")


def hf_step_names(processors: List[LogitsProcessor]) -> tuple:
    return tuple(HF_NAMES[type(p).__name__] for p in processors)


ALL_ON = dict(temperature=0.7, top_k=200, top_p=0.95, min_p=0.02, typical_p=0.97, epsilon_cutoff=3e-4,
              eta_cutoff=1e-3, repetition_penalty=1.3)
COMBOS: List[Dict] = [
    ALL_ON,
    dict(temperature=0.8, top_k=50, top_p=0.9),
    dict(temperature=1.3, min_p=0.1),
    dict(temperature=0.6, top_p=0.8, repetition_penalty=1.1),
    dict(top_k=20, typical_p=0.9),
    dict(temperature=1.5, epsilon_cutoff=1e-3, eta_cutoff=2e-3),
    dict(temperature=0.9, top_k=10, top_p=0.5, min_p=0.3, typical_p=0.6, repetition_penalty=0.8),
    dict(),
]


def test_order_is_generates_order(tiny_model):
    names = hf_step_names(hf_processors(tiny_model, sampling_cfg(**ALL_ON), prompt_len=5))
    assert names == ORDER
    assert LogitsPipeline(sampling_cfg(**ALL_ON)).steps == ORDER


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("combo", COMBOS, ids=[",".join(c) or "none" for c in COMBOS])
@pytest.mark.parametrize("do_sample", [True, False], ids=["sample", "greedy"])
def test_pipeline_matches_generate(tiny_model, combo, seed, ties, do_sample):
    cfg = replace(StrategyConfig(), do_sample=do_sample, **combo)
    x, ctx = make_logits(seed, ties), make_context(seed)
    hf = hf_processors(tiny_model, cfg, prompt_len=ctx.shape[1])
    pipe = LogitsPipeline(cfg)
    assert pipe.steps == hf_step_names(hf)
    ours = pipe.process(x, ctx)
    assert_same(ours, hf(ctx, x.clone()))
    if do_sample:
        assert torch.isfinite(ours).any(dim=-1).all()  # min_tokens_to_keep=1 after every step
    else:
        assert torch.equal(pipe.sample(x, torch.Generator(), ctx), hf(ctx, x.clone()).argmax(dim=-1))


# ---------------------------------------------------------------------- greedy, shapes, dtypes, disabled values

@pytest.mark.parametrize("cfg", [
    StrategyConfig(),
    replace(StrategyConfig(), typical_p=0.2, top_k=3),  # warpers are ignored when not sampling
    replace(StrategyConfig(), do_sample=True, temperature=0.0),  # bypasses validate; still argmax
], ids=["default", "greedy-with-warpers", "temperature0"])
def test_greedy_is_argmax(cfg):
    pipe = LogitsPipeline(cfg)
    assert pipe.greedy and pipe.steps == ()
    x = make_logits(5, ties=True)
    expected = x.argmax(dim=-1)
    assert torch.equal(pipe.sample(x, torch.Generator().manual_seed(0)), expected)
    assert torch.equal(pipe.probs(x), torch.nn.functional.one_hot(expected, VOCAB).float())
    assert pipe.sample(x[2], torch.Generator()).item() == expected[2].item()


def test_disabled_values_are_skipped():
    pipe = LogitsPipeline(sampling_cfg())
    assert not pipe.greedy and pipe.steps == ()
    x = make_logits(0, ties=False)
    assert torch.equal(pipe.process(x), x)


def test_one_dim_and_dtype():
    pipe = LogitsPipeline(sampling_cfg(**ALL_ON))
    x, ctx = make_logits(1, ties=False), make_context(1)
    assert_same(pipe.process(x[4], ctx[4]), pipe.process(x, ctx)[4])
    half = pipe.process(x.bfloat16(), ctx)
    assert half.dtype == torch.float32
    assert_same(half, pipe.process(x.bfloat16().float(), ctx))
    assert pipe.sample(x[4], torch.Generator().manual_seed(0), ctx[4]).shape == ()
    assert pipe.sample(x, torch.Generator().manual_seed(0), ctx).shape == (ROWS,)
    with pytest.raises(ValueError, match="rows, vocab"):
        pipe.process(x[None])


# ---------------------------------------------------------------------- seeding and the sampled distribution

def draw_sequence(pipe: LogitsPipeline, seed: int, steps: int = 64) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    x = make_logits(7, ties=False, rows=steps, vocab=50)
    return [int(pipe.sample(x[i], g)) for i in range(steps)]


def test_seed_reproduces_sequence():
    pipe = LogitsPipeline(sampling_cfg(temperature=1.5))
    assert draw_sequence(pipe, 123) == draw_sequence(pipe, 123)
    assert draw_sequence(pipe, 123) != draw_sequence(pipe, 124)
    # a second pipeline built from the same config draws the same tokens (target and draft side alike)
    assert draw_sequence(LogitsPipeline(sampling_cfg(temperature=1.5)), 123) == draw_sequence(pipe, 123)


@pytest.mark.parametrize("combo", [dict(), dict(temperature=0.8, top_k=12, top_p=0.9),
                                   dict(temperature=1.4, min_p=0.05, typical_p=0.95)],
                         ids=["plain", "topk-topp", "minp-typical"])
def test_empirical_distribution_matches_probs(combo):
    draws, vocab = 20_000, 20
    pipe = LogitsPipeline(sampling_cfg(**combo))
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(9)) * 2
    p = pipe.probs(logits)
    assert torch.allclose(p.sum(), torch.tensor(1.0))
    tokens = pipe.sample(logits.expand(draws, vocab), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=vocab).float() / draws
    assert (freq[p == 0] == 0).all(), "a filtered token was sampled"
    tv = 0.5 * (freq - p).abs().sum().item()
    assert tv < 0.02, f"total variation {tv:.4f}"

"""The decode loop against transformers.generate: greedy must be identical token for token."""

from __future__ import annotations

import pytest
import torch

from decodelab.adapter import LMAdapter
from decodelab.config import StrategyConfig
from decodelab.drafters.none import NoDrafter
from decodelab.config import DrafterConfig
from decodelab.engine import StopCriteria, decode
from decodelab.runner import eos_ids
from decodelab.sampling import LogitsPipeline

PROMPTS = [
    "Summarize: the quick brown fox jumps over the lazy dog, again and again, near the river bank.",
    "What is 12 times 7? Explain step by step.",
    "Translate to French: I would like a cup of coffee, please.",
]


def _encode(tokenizer, text):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


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
    ids = _encode(tiny_loaded.tokenizer, text)
    ours = _ours(tiny_loaded, ids, 40)
    assert ours.tokens == _reference(tiny_loaded, ids, 40)
    assert len(ours.tokens) == 40 or ours.stop_reason == "eos"


@pytest.mark.slow
@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_matches_generate_smollm2(smollm2_loaded, text):
    ids = _encode(smollm2_loaded.tokenizer, text)
    ours = _ours(smollm2_loaded, ids, 48)
    assert ours.tokens == _reference(smollm2_loaded, ids, 48)
    assert ours.ttft_s > 0 and ours.wall_s >= ours.ttft_s


def test_fixed_seed_reproduces_sample(tiny_loaded):
    ids = _encode(tiny_loaded.tokenizer, PROMPTS[0])
    strategy = StrategyConfig(name="sample", do_sample=True, temperature=1.0, top_p=0.95)
    first = _ours(tiny_loaded, ids, 24, strategy, seed=7).tokens
    assert _ours(tiny_loaded, ids, 24, strategy, seed=7).tokens == first
    assert _ours(tiny_loaded, ids, 24, strategy, seed=8).tokens != first


def test_max_new_tokens_and_steps(tiny_loaded):
    ids = _encode(tiny_loaded.tokenizer, PROMPTS[1])
    gen = _ours(tiny_loaded, ids, 5)
    assert len(gen.tokens) <= 5
    # first token comes from prefill; each later token from one single-token step.
    assert len(gen.steps) == len(gen.tokens) - 1
    assert gen.target_forwards == len(gen.tokens)


def test_stop_string_cuts_generation(tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    ids = _encode(tokenizer, PROMPTS[2])
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
    ids = _encode(tiny_loaded.tokenizer, PROMPTS[0])
    fresh = adapter.prefill(ids)
    adapter.forward([5, 6, 7])
    again = adapter.prefill(ids + [9])  # shares the prompt with the cache, diverges after it
    assert len(adapter.tokens) == len(ids) + 1
    reference = LMAdapter(tiny_loaded.model).prefill(ids + [9])
    torch.testing.assert_close(again, reference, rtol=1e-4, atol=1e-4)
    assert fresh.shape == again.shape

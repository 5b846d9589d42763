"""Contrastive search: its config checks, greedy at penalty_alpha=0, and an independent uncached reference
(transformers' own forward with output_hidden_states) at penalty_alpha>0, on the tiny model and on SmolLM2."""

from __future__ import annotations

from typing import List, Sequence

import pytest
import torch
import torch.nn.functional as F

from decodelab.config import DrafterConfig, StrategyConfig
from decodelab.decoding.engine import decode
from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.drafters.none import NoDrafter
from decodelab.errors import UserError
from decodelab.experiment.compose import compose, to_run_config
from decodelab.experiment.runner import eos_ids, run
from decodelab.strategies.contrastive_search import ContrastiveSearch, ContrastiveSearchConfig
from decodelab.strategies.registry import REGISTRY, strategy_config
from tests.helpers.decoding import assert_bad_value_is_named, encode_chat

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Summarize: the quick brown fox jumps over the lazy dog, again and again, near the river bank.",
    "What is 12 times 7? Explain step by step.",
    "Translate to French: I would like a cup of coffee, please.",
]


def _stop(loaded, max_new_tokens: int) -> StopCriteria:
    return StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)


def _contrastive(loaded, ids, max_new_tokens, alpha, top_k=4, repetition_penalty=1.0):
    cfg = ContrastiveSearchConfig(penalty_alpha=alpha, top_k=top_k, repetition_penalty=repetition_penalty)
    cfg.validate()
    return ContrastiveSearch(cfg).generate(LMAdapter(loaded.model, hidden_states=True), ids,
                                           pipeline=LogitsPipeline(cfg), drafter=NoDrafter(DrafterConfig()),
                                           stop=_stop(loaded, max_new_tokens), generator=torch.Generator())


def _greedy(loaded, ids, max_new_tokens, repetition_penalty=1.0):
    pipeline = LogitsPipeline(StrategyConfig(repetition_penalty=repetition_penalty))
    return decode(LMAdapter(loaded.model), ids, pipeline=pipeline, drafter=NoDrafter(DrafterConfig()),
                  stop=_stop(loaded, max_new_tokens), generator=torch.Generator())


@torch.inference_mode()
def _reference(model, ids: Sequence[int], k: int, alpha: float, max_new_tokens: int, eos: set) -> List[int]:
    """Contrastive search without a cache: every candidate's whole sequence through the model's own forward,
    its last hidden state as transformers reports it (after the final norm)."""
    seq = list(ids)
    out = model(torch.tensor([seq]), output_hidden_states=True)
    context, logits = out.hidden_states[-1][0].float(), out.logits[0, -1].float()
    tokens: List[int] = []
    while len(tokens) < max_new_tokens and (not tokens or tokens[-1] not in eos):
        top = logits.softmax(-1).topk(k)
        out = model(torch.tensor([seq + [c] for c in top.indices.tolist()]), output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -1].float()
        penalty = (F.normalize(hidden, dim=-1) @ F.normalize(context, dim=-1).T).max(-1).values
        chosen = int(((1 - alpha) * top.values - alpha * penalty).argmax())
        tokens.append(int(top.indices[chosen]))
        seq.append(tokens[-1])
        context = torch.cat([context, hidden[chosen:chosen + 1]])
        logits = out.logits[chosen, -1].float()
    return tokens


# ---------------------------------------------------------------------------------------------- config

def test_yaml_composes_to_the_schema():
    assert REGISTRY["contrastive_search"] is ContrastiveSearch
    typed = strategy_config(compose(["strategy=contrastive_search", "tracking=none"]).strategy)
    assert typed == ContrastiveSearchConfig()
    assert typed.top_k == 4 and typed.penalty_alpha == 0.6 and not typed.do_sample
    run_cfg = to_run_config(compose(["model=tiny-random", "strategy=contrastive_search", "tracking=none",
                                     "output_dir=unused"]))
    assert isinstance(run_cfg.strategy, ContrastiveSearchConfig)


@pytest.mark.parametrize("override, key", [
    ("strategy.penalty_alpha=1.5", "strategy.penalty_alpha"),
    ("strategy.penalty_alpha=-0.1", "strategy.penalty_alpha"),
    ("strategy.top_k=0", "strategy.top_k"),
    ("strategy.do_sample=true", "strategy.do_sample"),
    ("drafter=suffix", "drafter"),
])
def test_bad_values_are_named(override, key):
    assert_bad_value_is_named("contrastive_search", override, key, ["model=tiny-random"], group="strategy")


def test_alpha_range_is_in_the_message():
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        ContrastiveSearchConfig(penalty_alpha=2.0).validate()


def test_dynamic_cache_is_refused(tmp_path):
    cfg = compose(["model=tiny-random", "strategy=contrastive_search", "backend.kv_cache=dynamic", "tracking=none"])
    with pytest.raises(UserError, match=r"backend\.kv_cache"):
        run(cfg, output_dir=str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- tiny model

@pytest.mark.parametrize("text", PROMPTS)
def test_alpha_zero_is_greedy_tiny(tiny_loaded, text):
    ids = encode_chat(tiny_loaded.tokenizer, text)
    ours = _contrastive(tiny_loaded, ids, 40, alpha=0.0)
    assert ours.tokens == _greedy(tiny_loaded, ids, 40).tokens
    assert ours.target_forwards == 1 + len(ours.tokens)  # the prefill, then one forward of k candidates per token


def test_alpha_zero_is_greedy_with_repetition_penalty(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[2])
    ours = _contrastive(tiny_loaded, ids, 40, alpha=0.0, repetition_penalty=1.3)
    assert ours.tokens == _greedy(tiny_loaded, ids, 40, repetition_penalty=1.3).tokens


@pytest.mark.parametrize("text", PROMPTS)
def test_matches_uncached_reference_tiny(tiny_loaded, text):
    ids = encode_chat(tiny_loaded.tokenizer, text)
    ours = _contrastive(tiny_loaded, ids, 32, alpha=0.6)
    assert ours.tokens == _reference(tiny_loaded.model, ids, 4, 0.6, 32, set(eos_ids(tiny_loaded)))


def test_penalty_changes_the_output_and_is_deterministic(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[0])
    first = _contrastive(tiny_loaded, ids, 24, alpha=0.6)
    assert first.tokens == _contrastive(tiny_loaded, ids, 24, alpha=0.6).tokens
    assert first.tokens != _greedy(tiny_loaded, ids, 24).tokens
    assert len(first.tokens) == 24 and first.stop_reason == "max_new_tokens"
    assert 0 < first.ttft_s <= first.wall_s


def test_top_k_one_is_greedy(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[1])
    assert _contrastive(tiny_loaded, ids, 24, alpha=0.9, top_k=1).tokens == _greedy(tiny_loaded, ids, 24).tokens


def test_run_end_to_end(tmp_path):
    cfg = compose(["model=tiny-random", "strategy=contrastive_search", "tracking=none", "task.limit=2",
                   "task.max_new_tokens=8"])
    summary = run(cfg, output_dir=str(tmp_path / "run"))
    assert summary["status"] == "FINISHED" and summary["throughput_tok_s"] > 0
    # One prefill per turn, then one forward per token.
    assert 1 < summary["target_forwards_per_token"] <= 2


# ---------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_greedy_at_alpha_zero_and_reference(smollm2_loaded):
    for text in PROMPTS:
        ids = encode_chat(smollm2_loaded.tokenizer, text)
        assert _contrastive(smollm2_loaded, ids, 32, alpha=0.0).tokens == _greedy(smollm2_loaded, ids, 32).tokens
    ids = encode_chat(smollm2_loaded.tokenizer, PROMPTS[0])
    ours = _contrastive(smollm2_loaded, ids, 12, alpha=0.6)
    assert ours.tokens == _reference(smollm2_loaded.model, ids, 4, 0.6, 12, set(eos_ids(smollm2_loaded)))

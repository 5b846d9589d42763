"""MBR decoding: the selection rule by hand, its config checks, the choice recomputed from the candidates
(texts under ROUGE-L, hidden states under transformers' own forward), drafters, and end-to-end runs."""

from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn.functional as F

from decodelab.config import DrafterConfig
from decodelab.decoding.engine import decode
from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Generation
from decodelab.drafters.none import NoDrafter
from decodelab.drafters.registry import build_drafter, drafter_config
from decodelab.experiment.compose import compose, to_run_config
from decodelab.tasks.metrics import rouge_l
from decodelab.experiment.runner import eos_ids, run
from decodelab.strategies.mbr import Mbr, MbrConfig, expected_utilities, select
from decodelab.strategies.registry import REGISTRY, strategy_config
from tests.helpers.decoding import assert_bad_value_is_named, encode_chat

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Summarize: the quick brown fox jumps over the lazy dog, again and again, near the river bank."


def _rouge(hypothesis: str, reference: str) -> float:
    return rouge_l(reference, hypothesis)


def _mbr(loaded, cfg: MbrConfig, ids, max_new_tokens=12, seed=0, drafter=None) -> Generation:
    cfg.validate()
    target = LMAdapter(loaded.model, hidden_states=cfg.utility == "embedding")
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    return Mbr(cfg, loaded=loaded).generate(target, ids, pipeline=LogitsPipeline(cfg),
                                            drafter=drafter or NoDrafter(DrafterConfig()), stop=stop,
                                            generator=torch.Generator().manual_seed(seed))


def _candidates(loaded, cfg: MbrConfig, ids, max_new_tokens=12, seed=0) -> List[Generation]:
    """What MBR samples: num_samples plain decodes from one generator, advanced from one to the next."""
    target = LMAdapter(loaded.model)
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(cfg.num_samples):
        target.reset()
        out.append(decode(target, ids, pipeline=LogitsPipeline(cfg), drafter=NoDrafter(DrafterConfig()), stop=stop,
                          generator=generator))
    return out


# ---------------------------------------------------------------------------------------------- selection

def test_select_picks_the_consensus_string():
    candidates = ["the cat lay on a rug", "the cat sat on the mat", "stock prices fell sharply today",
                  "a cat sat on the mat"]
    means = expected_utilities(candidates, _rouge)
    assert means[2] == 0.0 and max(means) == means[1]
    assert select(candidates, _rouge) == 1


def test_rouge_utility_is_the_task_scorer():
    utility = Mbr(MbrConfig()).utility
    for hypothesis, reference in [("the cat sat on the mat", "a cat sat"), ("Running dogs", "the dog runs"), ("", "x")]:
        assert utility(hypothesis, reference) == rouge_l(reference, hypothesis)


def test_select_ties_go_to_the_earliest_and_utility_is_directed():
    assert select([1, 5, 6, 100], lambda a, b: -abs(a - b)) == 1  # 5 and 6 tie
    assert select(["x", "x", "x"], _rouge) == 0
    # Hypothesis first: the candidate whose utility against the others is high wins, not the one others like.
    assert expected_utilities(["a", "b"], lambda h, r: 1.0 if h == "a" else 0.0) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------- config

def test_yaml_composes_to_the_schema():
    assert REGISTRY["mbr"] is Mbr
    typed = strategy_config(compose(["strategy=mbr", "tracking=none"]).strategy)
    assert typed == MbrConfig() and typed.do_sample and typed.num_samples == 8 and typed.utility == "rouge_l"
    run_cfg = to_run_config(compose(["model=tiny-random", "strategy=mbr", "drafter=prompt_lookup", "tracking=none",
                                     "output_dir=unused"]))
    assert isinstance(run_cfg.strategy, MbrConfig) and run_cfg.drafter.name == "prompt_lookup"


@pytest.mark.parametrize("override, key", [
    ("strategy.num_samples=1", "strategy.num_samples"),
    ("strategy.do_sample=false", "strategy.do_sample"),
    ("strategy.utility=bleu", "strategy.utility"),
])
def test_bad_values_are_named(override, key):
    assert_bad_value_is_named("mbr", override, key, ["model=tiny-random"], group="strategy")


def test_chrf_is_the_task_scorer(tiny_loaded):
    from decodelab.tasks.metrics import chrf

    strategy = Mbr(MbrConfig(utility="chrf"), loaded=tiny_loaded)
    assert strategy.utility("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert strategy.utility("le chat", "the cat sat on the mat") == pytest.approx(chrf("the cat sat on the mat", "le chat"))
    assert 0 < strategy.utility("the cat sat", "the cat sat down") < 1
    assert not strategy.hidden_states  # text utilities keep the compiled static path and any cache


# ---------------------------------------------------------------------------------------------- tiny model

def test_choice_is_the_candidate_of_highest_mean_rouge(tiny_loaded):
    cfg = MbrConfig(num_samples=4)
    ids = encode_chat(tiny_loaded.tokenizer, PROMPT)
    ours = _mbr(tiny_loaded, cfg, ids)
    candidates = _candidates(tiny_loaded, cfg, ids)
    assert len({tuple(c.tokens) for c in candidates}) > 1  # independent draws, not one sample four times
    texts = [tiny_loaded.tokenizer.decode(c.tokens, skip_special_tokens=True) for c in candidates]
    best = candidates[select(texts, _rouge)]
    assert ours.tokens == best.tokens and ours.stop_reason == best.stop_reason
    # The cost is all of the samples.
    assert ours.target_forwards == sum(c.target_forwards for c in candidates)
    assert len(ours.steps) == sum(len(c.steps) for c in candidates)
    assert ours.wall_s >= ours.ttft_s > 0
    assert _mbr(tiny_loaded, cfg, ids).tokens == ours.tokens  # the seed fixes the whole set


def test_embedding_utility_matches_model_hidden_states(tiny_loaded):
    cfg = MbrConfig(num_samples=3, utility="embedding")
    ids = encode_chat(tiny_loaded.tokenizer, PROMPT)
    ours = _mbr(tiny_loaded, cfg, ids)
    candidates = _candidates(tiny_loaded, cfg, ids)
    with torch.inference_mode():
        pooled = [loaded_hidden(tiny_loaded, ids, c.tokens) for c in candidates]
    best = candidates[select(pooled, lambda a, b: float(F.cosine_similarity(a, b, dim=0)))]
    assert ours.tokens == best.tokens
    # One prefill of prompt + candidate per sample, beside the samples' own forwards.
    assert ours.target_forwards == sum(c.target_forwards for c in candidates) + cfg.num_samples
    assert Mbr(cfg, loaded=tiny_loaded).hidden_states


def loaded_hidden(loaded, ids, tokens) -> torch.Tensor:
    """Mean final hidden state over the candidate's positions, from transformers' forward (after the norm)."""
    out = loaded.model(torch.tensor([list(ids) + list(tokens)]), output_hidden_states=True)
    return out.hidden_states[-1][0, -len(tokens):].float().mean(dim=0)


def test_with_a_drafter_runs_and_records_steps(tiny_loaded):
    cfg = MbrConfig(num_samples=3)
    ids = encode_chat(tiny_loaded.tokenizer, PROMPT)
    drafter = build_drafter(drafter_config({"name": "prompt_lookup"}), target=None, loaded=tiny_loaded)
    ours = _mbr(tiny_loaded, cfg, ids, max_new_tokens=16, drafter=drafter)
    assert 1 <= len(ours.tokens) <= 16 and not ours.lossy
    assert sum(s.drafted for s in ours.steps) > 0  # the drafter did propose (this seed)
    # Each sample commits its first token at the prefill, then one step per forward.
    assert ours.target_forwards == len(ours.steps) + cfg.num_samples
    assert all(s.bonus == 1 for s in ours.steps)


def test_run_end_to_end(tmp_path):
    cfg = compose(["model=tiny-random", "strategy=mbr", "strategy.num_samples=3", "tracking=none", "task.limit=2",
                   "task.max_new_tokens=8"])
    summary = run(cfg, output_dir=str(tmp_path / "run"))
    assert summary["status"] == "FINISHED" and summary["throughput_tok_s"] > 0
    # At least one forward per sampled token, over three samples per answer.
    assert summary["target_forwards_per_token"] >= 2.5


def test_run_end_to_end_with_drafter(tmp_path):
    cfg = compose(["model=tiny-random", "strategy=mbr", "strategy.num_samples=2", "drafter=prompt_lookup",
                   "baseline=none", "tracking=none", "task.limit=2", "task.max_new_tokens=8"])
    summary = run(cfg, output_dir=str(tmp_path / "run"))
    assert summary["status"] == "FINISHED" and summary["target_forwards_per_token"] > 0


# ---------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_choice_is_the_candidate_of_highest_mean_rouge(smollm2_loaded):
    cfg = MbrConfig(num_samples=4, top_p=0.9)
    ids = encode_chat(smollm2_loaded.tokenizer, PROMPT)
    ours = _mbr(smollm2_loaded, cfg, ids, max_new_tokens=24, seed=3)
    candidates = _candidates(smollm2_loaded, cfg, ids, max_new_tokens=24, seed=3)
    texts = [smollm2_loaded.tokenizer.decode(c.tokens, skip_special_tokens=True) for c in candidates]
    assert len(set(texts)) > 1 and all(t.strip() for t in texts)
    assert ours.tokens == candidates[select(texts, _rouge)].tokens

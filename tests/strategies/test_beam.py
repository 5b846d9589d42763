"""Beam search equals transformers.generate(num_beams=k) token for token; diverse beam search keeps groups apart."""

from __future__ import annotations

import pytest
import torch

from decodelab.experiment.runner import eos_ids
from decodelab.strategies.beam import banned_ngram_tokens
from decodelab.tasks.specbench_mini import load_specbench_mini
from tests.helpers.decoding import encode_chat
from tests.helpers.strategies import generate, strategy_for

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Summarize: the quick brown fox jumps over the lazy dog, again and again, near the river bank.",
    "What is 12 times 7? Explain step by step.",
]


def hf_beam(loaded, ids, max_new_tokens, **kwargs):
    input_ids = torch.tensor([ids])
    out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=eos_ids(loaded),
                                pad_token_id=eos_ids(loaded)[0], **kwargs)
    return out[0, len(ids):].tolist()


def test_one_beam_is_greedy(tiny_loaded):
    for text in PROMPTS:
        ids = encode_chat(tiny_loaded.tokenizer, text)
        greedy = generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=greedy"]), ids, 24)
        beam = generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=beam", "strategy.num_beams=1"]), ids, 24)
        assert beam.tokens == greedy.tokens


@pytest.mark.parametrize("settings", [
    {"num_beams": 3},
    {"num_beams": 4, "length_penalty": 0.5, "early_stopping": True},
    {"num_beams": 2, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3},
    {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0},
])
def test_beam_matches_generate_tiny(tiny_loaded, settings):
    overrides = ["strategy=beam"] + [f"strategy.{k}={str(v).lower()}" for k, v in settings.items()]
    strategy = strategy_for(tiny_loaded, overrides)
    for text in PROMPTS:
        ids = encode_chat(tiny_loaded.tokenizer, text)
        assert generate(tiny_loaded, strategy, ids, 20).tokens == hf_beam(tiny_loaded, ids, 20, **settings)


@pytest.mark.slow
@pytest.mark.parametrize("beams", [2, 4])
def test_beam_matches_generate_smollm2(smollm2_loaded, beams):
    """specbench-mini prompts, one ending on EOS (id 10) and one longer summarization (id 11)."""
    prompts = {p.id: p for p in load_specbench_mini()}
    strategy = strategy_for(smollm2_loaded, ["strategy=beam", f"strategy.num_beams={beams}"])
    for pid in ("10", "11", "28"):
        ids = encode_chat(smollm2_loaded.tokenizer, prompts[pid].turns[0])
        ours = generate(smollm2_loaded, strategy, ids, 24)
        assert ours.tokens == hf_beam(smollm2_loaded, ids, 24, num_beams=beams), pid


def test_banned_ngrams_by_hand():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 2) == {3}  # the last token 2 was followed by 3
    assert banned_ngram_tokens([5, 5], 2) == {5}
    assert banned_ngram_tokens([1, 2], 1) == {1, 2}  # unigrams: nothing may repeat
    assert banned_ngram_tokens([1], 3) == set()


def test_no_generated_token_repeats_a_bigram(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[0])
    tokens = ids + generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=beam", "strategy.no_repeat_ngram_size=2"]),
                            ids, 30).tokens
    bigrams = list(zip(tokens, tokens[1:]))
    # The prompt may repeat itself (the chat template does); no generated token completes a bigram seen before.
    for end in range(len(ids), len(tokens)):
        assert bigrams[end - 1] not in bigrams[:end - 1]


def test_groups_without_penalty_are_plain_beam_search(tiny_loaded):
    """Two groups of two beams with no diversity penalty are two identical beam searches of two beams."""
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[1])
    grouped = generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=diverse_beam", "strategy.diversity_penalty=0"]),
                       ids, 20)
    plain = generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=beam", "strategy.num_beams=2"]), ids, 20)
    assert grouped.tokens == plain.tokens


def test_diversity_penalty_keeps_groups_apart(tiny_loaded):
    """A large Hamming penalty: the second group never starts with a token the first group chose."""
    ids = encode_chat(tiny_loaded.tokenizer, PROMPTS[0])
    strategy = strategy_for(tiny_loaded, ["strategy=diverse_beam", "strategy.diversity_penalty=1000"])
    generate(tiny_loaded, strategy, ids, 12)
    first, second = ({beam[0] for beam in group.beams} for group in strategy.groups)
    assert first and second and not first & second
    calm = strategy_for(tiny_loaded, ["strategy=diverse_beam", "strategy.diversity_penalty=0"])
    generate(tiny_loaded, calm, ids, 12)
    assert {b[0] for b in calm.groups[0].beams} == {b[0] for b in calm.groups[1].beams}


def test_beam_run_records_cost(tmp_path):
    from decodelab.experiment.compose import compose
    from decodelab.experiment.runner import run

    summary = run(compose(["model=tiny-random", "strategy=beam", "strategy.num_beams=2", "tracking=none",
                           "task.limit=2", "task.max_new_tokens=8", "progress=false", "print_table=false"]),
                  output_dir=str(tmp_path))
    assert summary["status"] == "FINISHED" and summary["throughput_tok_s"] > 0
    assert 0 < summary["target_forwards_per_token"] <= 1.5  # one batched forward of both beams per token

"""Contrast strategies (contrastive decoding, CAD, DoLa): their scores by hand, and a drafter changes nothing."""

from __future__ import annotations

import pytest
import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.drafters.registry import build_drafter, drafter_config
from decodelab.errors import ConfigError, UserError
from decodelab.experiment.compose import compose, validate
from decodelab.strategies.dola import candidate_layers
from decodelab.strategies.contrastive_decoding import check_same_vocabulary
from decodelab.tasks.base import without_context
from decodelab.tasks.specbench_mini import load_specbench_mini
from tests.helpers.decoding import encode_chat
from tests.helpers.strategies import generate, strategy_for

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Passage: the river Ouse floods every spring and the town built a wall in 1990.\n\nQuestion: when was the wall built?"
CONTEXT = "Passage: the river Ouse floods every spring and the town built a wall in 1990."
AMATEUR = ["model@strategy.amateur=tiny-random", "strategy.amateur.init_seed=5"]


def drafter(name, loaded, target):
    return build_drafter(drafter_config({"name": name}), target=target, loaded=loaded)


def contrast_by_hand(loaded_main, loaded_other, ids, other_ids, weight):
    main = LMAdapter(loaded_main.model).prefill(ids)
    other = LMAdapter(loaded_other.model).prefill(other_ids)
    return (1 + weight) * main - weight * other


def test_cad_first_token_is_the_contrast_by_hand(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, TEXT)
    plain = encode_chat(tiny_loaded.tokenizer, without_context(TEXT, CONTEXT))
    strategy = strategy_for(tiny_loaded, ["strategy=cad", "strategy.alpha=1.0"])
    out = generate(tiny_loaded, strategy, ids, 6, plain_ids=plain)
    assert out.tokens[0] == int(contrast_by_hand(tiny_loaded, tiny_loaded, ids, plain, 1.0).argmax())
    assert out.aux_forwards == out.target_forwards  # one context-free pass per target forward
    # The second cache holds the question alone, then the same answer (the offset crop and keep apply).
    assert strategy.scorer.other.tokens == plain + out.tokens[:-1]


def test_cad_without_weight_is_greedy(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, TEXT)
    plain = encode_chat(tiny_loaded.tokenizer, without_context(TEXT, CONTEXT))
    cad = generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=cad", "strategy.alpha=0"]), ids, 16, plain_ids=plain)
    assert cad.tokens == generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=greedy"]), ids, 16).tokens


@pytest.mark.parametrize("name", ["prompt_lookup", "token_recycling", "lookahead"])
def test_a_drafter_accelerates_cad_losslessly(tiny_loaded, name):
    """Chains (prompt_lookup), trees kept by index (token_recycling) and lookahead's own tree forwards."""
    ids = encode_chat(tiny_loaded.tokenizer, TEXT + " " + TEXT)
    plain = encode_chat(tiny_loaded.tokenizer, without_context(TEXT, CONTEXT))
    alone = generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=cad"]), ids, 24, plain_ids=plain)
    strategy = strategy_for(tiny_loaded, ["strategy=cad"])
    target = strategy.wrap(LMAdapter(tiny_loaded.model))
    fast = generate(tiny_loaded, strategy, ids, 24, plain_ids=plain, target=target,
                    drafter=drafter(name, tiny_loaded, target))
    assert fast.tokens == alone.tokens


def test_contrastive_decoding_by_hand_and_with_a_drafter(tiny_loaded):
    strategy = strategy_for(tiny_loaded, ["strategy=contrastive_decoding", "strategy.alpha=0", "strategy.beta=0.5", *AMATEUR])
    ids = encode_chat(tiny_loaded.tokenizer, TEXT)
    out = generate(tiny_loaded, strategy, ids, 16)
    assert out.tokens[0] == int(contrast_by_hand(tiny_loaded, strategy.amateur, ids, ids, 0.5).argmax())
    target = strategy.wrap(LMAdapter(tiny_loaded.model))
    fast = generate(tiny_loaded, strategy, ids, 16, target=target, drafter=drafter("suffix", tiny_loaded, target))
    assert fast.tokens == out.tokens
    assert out.aux_forwards == out.target_forwards


def test_plausibility_cutoff_keeps_only_tokens_the_expert_finds_likely(tiny_loaded):
    """With alpha close to 1 only the expert's top token survives: contrastive decoding is then greedy."""
    ids = encode_chat(tiny_loaded.tokenizer, TEXT)
    strict = strategy_for(tiny_loaded, ["strategy=contrastive_decoding", "strategy.alpha=0.999", "strategy.beta=5", *AMATEUR])
    greedy = generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=greedy"]), ids, 12)
    assert generate(tiny_loaded, strict, ids, 12).tokens == greedy.tokens


def test_vocabulary_mismatch_is_refused(tiny_loaded, smollm2_loaded):
    with pytest.raises(ConfigError, match="strategy.amateur"):
        check_same_vocabulary(smollm2_loaded, tiny_loaded, "strategy.amateur")


def test_residual_stream_matches_transformers(tiny_loaded):
    """DoLa reads premature layers from the static forward: they are transformers' hidden states."""
    ids = encode_chat(tiny_loaded.tokenizer, TEXT)
    adapter = LMAdapter(tiny_loaded.model, hidden_states=True)
    adapter.forward(ids)
    with torch.inference_mode():
        reference = tiny_loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    stream = adapter.hidden_states
    assert len(stream) == len(reference)
    for ours, theirs in zip(stream[:-1], reference[:-1]):
        torch.testing.assert_close(ours, theirs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tiny_loaded.model.model.norm(stream[-1]), reference[-1][0], rtol=1e-4, atol=1e-4)


def test_dola_layer_sets():
    assert candidate_layers("high", 30, tied=True) == list(range(15, 30, 2))
    assert candidate_layers("low", 30, tied=True) == list(range(2, 15, 2))
    assert candidate_layers("low", 30, tied=False) == list(range(0, 15, 2))
    assert candidate_layers("high", 48, tied=False) == list(range(28, 48, 2))
    assert candidate_layers([3, 7], 30, tied=True) == [3, 7]
    with pytest.raises(ConfigError, match=r"strategy\.layers: layer 30 is outside"):
        candidate_layers([3, 30], 30, tied=True)


def test_dola_single_layer_by_hand(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, TEXT)
    strategy = strategy_for(tiny_loaded, ["strategy=dola", "strategy.layers=[1]", "strategy.repetition_penalty=1.0",
                                          "strategy.cutoff=0.001"])
    out = generate(tiny_loaded, strategy, ids, 4)
    with torch.inference_mode():
        states = tiny_loaded.model(torch.tensor([ids]), output_hidden_states=True)
        final = torch.log_softmax(states.logits[0, -1].float(), -1)
        early = torch.log_softmax(tiny_loaded.model.lm_head(tiny_loaded.model.model.norm(states.hidden_states[1][0, -1])).float(), -1)
    scores = torch.where(final >= final.max() + torch.log(torch.tensor(0.001)), final - early, torch.tensor(float("-inf")))
    assert out.tokens[0] == int(scores.argmax())


@pytest.mark.slow
def test_dola_on_smollm2_with_a_drafter_is_lossless(smollm2_loaded):
    prompt = next(p for p in load_specbench_mini() if p.category == "summarization")
    ids = encode_chat(smollm2_loaded.tokenizer, prompt.turns[0])
    alone = generate(smollm2_loaded, strategy_for(smollm2_loaded, ["strategy=dola"]), ids, 24)
    strategy = strategy_for(smollm2_loaded, ["strategy=dola"])
    target = strategy.wrap(LMAdapter(smollm2_loaded.model, hidden_states=True))
    fast = generate(smollm2_loaded, strategy, ids, 24, target=target, drafter=drafter("prompt_lookup", smollm2_loaded, target))
    assert fast.tokens == alone.tokens
    greedy = generate(smollm2_loaded, strategy_for(smollm2_loaded, ["strategy=greedy"]), ids, 24)
    assert alone.tokens != greedy.tokens  # the contrast changes what is decoded


@pytest.mark.slow
def test_cad_on_smollm2_rag_with_a_drafter_is_lossless(smollm2_loaded):
    prompt = next(p for p in load_specbench_mini() if p.category == "rag")
    ids = encode_chat(smollm2_loaded.tokenizer, prompt.turns[0])
    plain = encode_chat(smollm2_loaded.tokenizer, without_context(prompt.turns[0], prompt.context))
    alone = generate(smollm2_loaded, strategy_for(smollm2_loaded, ["strategy=cad"]), ids, 24, plain_ids=plain)
    strategy = strategy_for(smollm2_loaded, ["strategy=cad"])
    target = strategy.wrap(LMAdapter(smollm2_loaded.model))
    fast = generate(smollm2_loaded, strategy, ids, 24, plain_ids=plain, target=target,
                    drafter=drafter("prompt_lookup", smollm2_loaded, target))
    assert fast.tokens == alone.tokens


def test_contrast_runs_end_to_end(tmp_path):
    from decodelab.experiment.runner import run

    for name, extra in [("cad", ["task.categories=[rag]", "drafter=prompt_lookup", "baseline=fresh"]),
                        ("dola", ["drafter=suffix", "baseline=fresh"]), ("contrastive_decoding", AMATEUR)]:
        summary = run(compose(["model=tiny-random", f"strategy={name}", "tracking=none", "task.limit=2",
                               "task.max_new_tokens=8", "progress=false", "print_table=false", *extra]),
                      output_dir=str(tmp_path / name))
        assert summary["status"] == "FINISHED", name
        if name != "dola":
            assert summary["aux_forwards_per_token"] > 0, name
        if "baseline=fresh" in extra:
            assert summary["lossless_rate"] == 1.0, name


def test_dola_refuses_models_without_the_static_forward():
    with pytest.raises(UserError, match="backend.kv_cache"):
        validate(compose(["model=tiny-random", "strategy=dola", "backend.kv_cache=dynamic", "tracking=none"]))


def test_cad_plain_skips_the_second_pass_on_prompts_without_context(tiny_loaded):
    ids = encode_chat(tiny_loaded.tokenizer, "What is 12 times 7?")
    out = generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=cad_plain"]), ids, 12)
    assert out.aux_forwards == 0
    assert out.tokens == generate(tiny_loaded, strategy_for(tiny_loaded, ["strategy=greedy"]), ids, 12).tokens

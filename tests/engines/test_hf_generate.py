"""engine=hf_generate on tiny-random: transformers' generate serves the same composition, its tokens equal decodelab's
AR, the observed steps add up to what it committed, the assistant and early-exit mappings draft what they should,
and what it cannot serve is refused in one line."""

from __future__ import annotations

import pytest

from decodelab.engines.registry import REGISTRY
from decodelab.errors import UserError
from decodelab.experiment.compose import compose, to_run_config
from tests.helpers.engines import decode as run_and_read

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["model=tiny-random", "task.limit=3", "task.max_new_tokens=40", "tracking=none", "baseline=fresh",
        "progress=false", "print_table=false"]


def decode(tmp_path, *overrides):
    return run_and_read(tmp_path, BASE, *overrides)


def test_every_engine_is_registered():
    assert {"decodelab", "hf_generate"} <= set(REGISTRY)


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_greedy_tokens_equal_decodelab_ar_and_steps_add_up(tmp_path, drafter):
    summary, samples = decode(tmp_path, "engine=hf_generate", f"drafter={drafter}")
    assert summary["lossless_rate"] == 1.0  # token for token against decodelab's AR (the fresh baseline)
    for sample in samples:
        steps = sample["steps"]
        committed = sum(s[1] + s[2] for s in steps)
        prefill = sample["target_forwards"] - len(steps)  # plain generate's first forward per turn: the prefill
        assert 0 <= prefill <= len(sample["turns"])
        assert committed + prefill >= sample["new_tokens"] > committed + prefill - 1 - max((s[1] for s in steps), default=0)
        if drafter == "none":
            assert all(s[0] == 0 for s in steps) and sample["target_forwards"] == sample["new_tokens"]
            assert prefill == len(sample["turns"])
    if drafter == "ngram":
        assert summary["acceptance_rate"] > 0 and summary["mean_accepted_length"] > 1.0


def test_assistant_that_is_the_target_accepts_every_candidate(tmp_path):
    """The draft model is the target itself: every candidate must be accepted (constant schedule of k, the
    confidence stop off), so tau is k + 1 wherever the budget allows."""
    summary, samples = decode(tmp_path, "engine=hf_generate", "drafter=draft_model", "model@drafter.model=tiny-random",
                              "drafter.length.k=4")
    assert summary["lossless_rate"] == 1.0 and summary["acceptance_rate"] == 1.0
    full = [s for sample in samples for s in sample["steps"][:-1]]
    assert full and all(s[0] == 4 and s[1] == 4 for s in full)
    assert all(sample["draft_forwards"] > 0 for sample in samples)


def test_early_exit_at_the_last_layer_is_the_target(tmp_path):
    loaded_layers = to_run_config(compose([*BASE, "output_dir=x"]))  # tiny-random's layer count comes from its config
    layers = loaded_layers.model.num_layers
    summary, samples = decode(tmp_path, "engine=hf_generate", "drafter=layer_skip", f"drafter.exit_layer={layers}",
                              "drafter.length.k=3")
    assert summary["lossless_rate"] == 1.0 and summary["acceptance_rate"] == 1.0
    assert all(sample["draft_forwards"] > 0 for sample in samples)
    half, _ = decode(tmp_path, "engine=hf_generate", "drafter=layer_skip", "drafter.length.k=3")
    assert half["lossless_rate"] == 1.0 and half["acceptance_rate"] < 1.0


def test_sampling_is_seeded_per_prompt(tmp_path):
    first, a = decode(tmp_path / "a", "engine=hf_generate", "strategy=sample", "strategy.temperature=1.5")
    again, b = decode(tmp_path / "b", "engine=hf_generate", "strategy=sample", "strategy.temperature=1.5")
    other, c = decode(tmp_path / "c", "engine=hf_generate", "strategy=sample", "strategy.temperature=1.5",
                      "strategy.seed=7")
    assert [s["output_tokens"] for s in a] == [s["output_tokens"] for s in b]
    assert [s["output_tokens"] for s in a] != [s["output_tokens"] for s in c]


@pytest.mark.parametrize("overrides, words", [
    (["drafter=suffix"], ["drafter", "engine=hf_generate", "drafter=suffix", "prompt_lookup", "draft_model"]),
    (["strategy=beam"], ["strategy", "engine=hf_generate", "strategy=beam", "greedy"]),
    (["backend.compile=true"], ["backend.compile", "engine=hf_generate"]),
    (["task.concurrency=4"], ["task.concurrency", "engine=hf_generate", "one request at a time"]),
    (["drafter=ngram", "drafter.min_ngram_size=2"], ["drafter.min_ngram_size", "engine=hf_generate"]),
    (["drafter=prompt_lookup"], ["drafter.occurrence", "engine=hf_generate", "occurrence=latest", "earliest"]),
    (["drafter=layer_skip", "drafter.skip_layers=[1]"], ["drafter.skip_layers", "engine=hf_generate"]),
    (["drafter=layer_skip", "drafter.length.policy=ucb"], ["drafter.length.policy", "policy=ucb", "fixed"]),
])
def test_what_it_cannot_serve_is_refused_in_one_line(overrides, words):
    with pytest.raises(UserError) as err:
        to_run_config(compose([*BASE, "engine=hf_generate", *overrides, "output_dir=x"]))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_decodelab_engine_refuses_concurrency():
    with pytest.raises(UserError, match=r"task.concurrency: engine=decodelab decodes one request at a time"):
        to_run_config(compose([*BASE, "task.concurrency=2", "output_dir=x"]))


@pytest.mark.slow
def test_smollm2_ngram_through_generate_is_lossless_and_tau_agrees(tmp_path):
    """The real model: transformers' prompt lookup and decodelab's drafter=ngram (the same first-occurrence
    rule) give AR's tokens, and tau within 5% (transformers drafts one token deeper at the budget's end)."""
    real = ["model=smollm2-135m", "task.limit=2", "task.max_new_tokens=32", "tracking=none", "baseline=fresh",
            "progress=false", "print_table=false"]
    ours, _ = run_and_read(tmp_path, real, "drafter=ngram")
    theirs, _ = run_and_read(tmp_path, real, "engine=hf_generate", "drafter=ngram")
    assert ours["lossless_rate"] == theirs["lossless_rate"] == 1.0
    assert theirs["mean_accepted_length"] == pytest.approx(ours["mean_accepted_length"], rel=0.05)

"""MAUVE on the tiny random model's own features: the score orders text sets the way it should, the features
have the right shape, and too few texts give no score and say why."""

from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("mauve", reason="optional extra: pip install 'decodelab[quality]'")

from decodelab.experiment.mauve import (MIN_TEXTS, category_mauve, hidden_features, human_reference,  # noqa: E402
                                        mauve_score, num_buckets_for, target_features)

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on a mat while the dog ran around the old garden near our quiet house".split()


def _sentences(seed: int, count: int = 30) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(count)]


def _symbols(seed: int, count: int = 30) -> list:
    rng = random.Random(seed)
    return ["".join(rng.choice("0123456789+-*/=") for _ in range(40)) for _ in range(count)]


@pytest.fixture(scope="module")
def features(tiny_loaded):
    return target_features(tiny_loaded.model, tiny_loaded.tokenizer)


def test_hidden_features_are_mean_pooled_last_layer(tiny_loaded):
    import torch

    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    rows = hidden_features(model, tokenizer, ["hello there", "x"])
    assert rows.shape == (2, model.config.hidden_size) and rows.dtype == np.float32
    ids = tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    np.testing.assert_allclose(rows[0], last.float().mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_identical_sets_score_one_different_sets_lower(features):
    refs = _sentences(0)
    same = mauve_score(refs, refs, features)
    assert same.reason is None and same.score == pytest.approx(1.0, abs=1e-6)
    assert same.num_texts == 30 and same.num_buckets == num_buckets_for(30) == 3
    alike = mauve_score(refs, _sentences(1), features).score  # same distribution, other texts
    unlike = mauve_score(refs, _symbols(2), features).score
    mixed = mauve_score(refs, _sentences(1, 15) + _symbols(2, 15), features).score
    assert alike > 0.9 and unlike < 0.1
    assert unlike < mixed < alike


def test_too_few_texts_is_none_with_the_reason(features):
    out = mauve_score(_sentences(0, 5), _sentences(1, MIN_TEXTS + 5), features)
    assert out.score is None and out.num_texts == 5
    assert out.reason == (f"too few texts for MAUVE: {MIN_TEXTS + 5} generations and 5 references (non-empty), "
                          f"needs >= {MIN_TEXTS} of each")
    # Empty generations do not count (nothing to pool), and no features are computed for a refused pair.
    calls = []
    out = mauve_score(_sentences(0), [""] * 10 + _sentences(1, MIN_TEXTS - 1),
                      lambda texts: calls.append(texts) or features(texts))
    assert out.score is None and out.num_texts == MIN_TEXTS - 1 and not calls


def test_bucket_count_fits_the_sample_count():
    assert [num_buckets_for(n) for n in (2, 20, 29, 30, 1000)] == [2, 2, 2, 3, 100]


def test_only_human_written_references_count():
    from decodelab.experiment.compose import compose, to_run_config
    from decodelab.tasks import load_task

    assert human_reference("A summary.", "rouge_l") == "A summary." and human_reference("Le train.", None)
    assert human_reference("18", "math_exact") is None and human_reference("Clara Voss", "exact") is None
    assert human_reference(None, None) is None and human_reference("  ", "rouge_l") is None
    prompts = load_task(to_run_config(compose(["tracking=none", "output_dir=unused"])).task)
    human = [p for p in prompts if human_reference(p.reference, p.scorer)]
    # specbench-mini: summaries and translations are text; math and RAG references are answer keys.
    assert sorted({p.category for p in human}) == ["summarization", "translation"]
    assert all(len(p.turns) == 1 for p in human) and len(human) < 2 * MIN_TEXTS  # 5 each: no MAUVE there


def test_category_mauve_scores_each_category_on_its_own(features):
    items = ([("story", ref, gen) for ref, gen in zip(_sentences(0), _sentences(1))]
             + [("story", None, "no reference: not counted")] * 3
             + [("digits", ref, gen) for ref, gen in zip(_symbols(3, 5), _sentences(4, 5))]
             + [("chat", None, "open-ended")])
    out = category_mauve(items, features)
    assert list(out) == ["digits", "story"]  # chat has no human reference at all
    assert out["story"].score > 0.9 and out["story"].num_texts == 30
    assert out["digits"].score is None and "5 generations and 5 references" in out["digits"].reason


def test_task_mauve_scores_categories_with_enough_references(tmp_path, capsys):
    """A jsonl task with 20 human-written summaries: the run records mauve/<category>; specbench-mini's 5 per
    category get one warning each instead."""
    import json

    from decodelab.experiment.compose import compose
    from decodelab.experiment.runner import run

    lines = [{"question_id": i, "category": "summarization", "turns": [f"Summarize: {text}"], "reference": text,
              "scorer": "rouge_l"} for i, text in enumerate(_sentences(0)[:MIN_TEXTS])]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    common = ["model=tiny-random", "tracking=none", "task.max_new_tokens=6", "task.mauve=true", "progress=false",
              "print_table=false"]
    summary = run(compose(common + ["task=jsonl", f"task.path={path}"]), output_dir=str(tmp_path / "jsonl"))
    assert 0 <= summary["mauve/summarization"] <= 1
    summary = run(compose(common + ["task.categories=[summarization]"]), output_dir=str(tmp_path / "mini"))
    assert not any(key.startswith("mauve") for key in summary)
    assert "task.mauve: no MAUVE for category summarization" in capsys.readouterr().err

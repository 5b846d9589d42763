"""Draft heads (decodelab/models/heads.py): the features they read, the EAGLE layer on the static forward, and
checkpoints that round-trip or are refused in one line."""

from __future__ import annotations

import pytest
import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.errors import UserError
from decodelab.models.heads import (SPEC_FILE, WEIGHTS_FILE, HeadSpec, build_head, head_rows, load_head, save_head,
                                    trained_state)
from tests.helpers.drafters import tiny_model

VOCAB = list(range(0, 320, 3))


@pytest.fixture(scope="module")
def loaded():
    return tiny_model()


def _spec(loaded, kind, vocab=VOCAB, heads=3):
    return HeadSpec(kind, heads if kind == "medusa" else 1, loaded.model.config.hidden_size, loaded.name,
                    loaded.fingerprint, vocab=vocab)


def _perturbed(loaded, kind, vocab=VOCAB):
    head = build_head(_spec(loaded, kind, vocab), loaded.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return head


def test_features_are_the_final_normed_hidden_states(loaded):
    ids = [5, 17, 99, 3, 250, 41]
    lm = LMAdapter(loaded.model)
    lm.forward(ids[:4])
    logits = lm.forward(ids[4:])
    with torch.no_grad():
        reference = loaded.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert torch.allclose(lm.features, reference[4:], atol=1e-5)
    # The LM head of the features is the logits: what a shared frozen head turns them into.
    assert torch.allclose(lm.features @ head_rows(loaded.model, None).T, logits, atol=1e-4)


def test_dynamic_cache_has_no_features(loaded):
    with pytest.raises(NotImplementedError, match="static forward"):
        LMAdapter(loaded.model, cache="dynamic").check_features()


def test_eagle_layer_on_the_static_forward_equals_its_training_pass(loaded):
    head = _perturbed(loaded, "eagle")
    features = torch.randn(1, 7, loaded.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        predicted, logits = head(features, tokens)
        vectors = head.fuse(features[0], tokens[0])
    lm = LMAdapter(head.decoder)
    # In two pieces, as drafting does (a catch-up, then one step): the cache is written by position.
    first = lm.forward(tokens[0, :5].tolist(), embeds=vectors[:5])
    first_features = lm.features.clone()
    second = lm.forward(tokens[0, 5:].tolist(), embeds=vectors[5:])
    assert logits.shape[-1] == len(VOCAB)
    assert torch.allclose(torch.cat([first, second]), logits[0], atol=1e-5)
    assert torch.allclose(torch.cat([first_features, lm.features]), predicted[0], atol=1e-5)


def test_zero_initialised_medusa_heads_are_the_lm_head(loaded):
    spec = _spec(loaded, "medusa", vocab=None)
    heads = build_head(spec, loaded.model)
    features = torch.randn(4, spec.hidden_size)
    logits = heads(features)
    assert logits.shape == (4, 3, 320)
    expected = features @ head_rows(loaded.model, None).T
    for k in range(3):
        assert torch.allclose(logits[:, k], expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_checkpoint_round_trips_without_the_targets_weights(loaded, kind, tmp_path):
    head = _perturbed(loaded, kind)
    save_head(tmp_path, head, _spec(loaded, kind))
    saved = trained_state(head)
    assert not any("embed_tokens" in k or "lm_head" in k or k == "head" for k in saved)
    again, spec = load_head(tmp_path, loaded.model, loaded.fingerprint, kind=kind)
    assert spec.vocab == VOCAB and spec.kind == kind
    features = torch.randn(1, 3, spec.hidden_size)
    tokens = torch.tensor([[4, 8, 15]])
    with torch.no_grad():
        before = head(features) if kind == "medusa" else head(features, tokens)[1]
        after = again(features) if kind == "medusa" else again(features, tokens)[1]
    assert torch.equal(before, after)


def test_bad_checkpoints_are_refused_in_one_line(loaded, tmp_path):
    head = _perturbed(loaded, "medusa")
    with pytest.raises(UserError, match=r"drafter\.checkpoint: no draft-head checkpoint"):
        load_head(tmp_path / "absent", loaded.model, loaded.fingerprint)
    save_head(tmp_path / "ok", head, _spec(loaded, "medusa"))
    with pytest.raises(UserError, match=r"trained for tiny-random .* not for other-model \(gguf:x\)"):
        load_head(tmp_path / "ok", loaded.model, "gguf:x", "other-model")
    with pytest.raises(UserError, match="holds a medusa head, drafter=eagle needs an? eagle"):
        load_head(tmp_path / "ok", loaded.model, loaded.fingerprint, kind="eagle")
    save_head(tmp_path / "json", head, _spec(loaded, "medusa"))
    (tmp_path / "json" / SPEC_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_head(tmp_path / "json", loaded.model, loaded.fingerprint)
    save_head(tmp_path / "weights", head, _spec(loaded, "medusa"))
    path = tmp_path / "weights" / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_head(tmp_path / "weights", loaded.model, loaded.fingerprint)
    for error in _errors(lambda: load_head(tmp_path / "weights", loaded.model, loaded.fingerprint)):
        assert "\n" not in error


def _errors(call):
    try:
        call()
    except UserError as err:
        return [str(err)]
    return []

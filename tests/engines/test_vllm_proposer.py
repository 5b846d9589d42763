"""engine.proposer=decodelab (decodelab/engines/vllm/proposer.py): decodelab's drafter behind vLLM's custom
proposer interface. Called here as vLLM's worker calls it (batch rows of numpy token arrays), so this runs
without vLLM; tests/engines/test_vllm.py runs it inside a real vLLM."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from decodelab.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter
from decodelab.engines.vllm.config import context_drafters, speculative_config
from decodelab.engines.vllm.proposer import DRAFTER_ENV, DecodelabProposer, drafter_json


def proposer(monkeypatch, cfg: PromptLookupConfig, max_model_len: int = 64) -> DecodelabProposer:
    monkeypatch.setenv(DRAFTER_ENV, drafter_json(cfg))
    spec = speculative_config(cfg, None, "decodelab")
    vllm_config = SimpleNamespace(speculative_config=SimpleNamespace(**spec),
                                  model_config=SimpleNamespace(max_model_len=max_model_len))
    return DecodelabProposer(vllm_config)


def batch(contexts, width=64):
    tokens = np.zeros((len(contexts), width), dtype=np.int32)
    for row, context in enumerate(contexts):
        tokens[row, :len(context)] = context
    return tokens, np.array([len(c) for c in contexts], dtype=np.int32)


def test_only_context_drafters_are_served_and_the_config_names_the_class():
    assert context_drafters() == ("prompt_lookup",)
    spec = speculative_config(PromptLookupConfig(num_speculative_tokens=6), None, "decodelab")
    assert spec == {"method": "custom_class", "model": "decodelab.engines.vllm.proposer.DecodelabProposer",
                    "num_speculative_tokens": 6}
    assert speculative_config(PromptLookupConfig(), None, "vllm")["method"] == "ngram"


@pytest.mark.parametrize("occurrence", ["latest", "earliest"])
def test_each_row_drafts_what_decodelabs_drafter_drafts_on_its_context(monkeypatch, occurrence):
    """Rows grow step by step, and a row's request is replaced midway (its context is no extension): every
    draft equals a fresh decodelab drafter's on that row's context."""
    cfg = PromptLookupConfig(occurrence=occurrence, num_speculative_tokens=4, max_ngram_size=3)
    served = proposer(monkeypatch, cfg)
    rng = random.Random(3)
    rows = [[rng.randrange(4) for _ in range(5)] for _ in range(3)]
    proposed = 0
    for step in range(30):
        if step == 12:
            rows[1] = [rng.randrange(4) for _ in range(6)]  # a new request in row 1
        for row in rows:
            row.extend(rng.randrange(4) for _ in range(rng.randrange(1, 3)))
        tokens, lengths = batch(rows)
        drafts = served.propose([[1]] * len(rows), lengths, tokens)
        for row, draft in zip(rows, drafts):
            assert draft == PromptLookupDrafter(cfg).propose(list(row)).tokens, row
            proposed += len(draft)
    assert proposed > 0


def test_no_draft_while_a_row_prefills_and_none_past_the_model_length(monkeypatch):
    served = proposer(monkeypatch, PromptLookupConfig(num_speculative_tokens=5, max_ngram_size=2), max_model_len=12)
    repeated = [1, 2, 3, 4, 5, 6, 1, 2]  # "1 2" occurred before: the draft is 3 4 5 6 1
    tokens, lengths = batch([repeated, repeated, repeated + [3, 4, 5, 6]])
    drafts = served.propose([[2], [], [6]], lengths, tokens)
    assert drafts[0] == [3, 4, 5, 6]  # room: 12 - 8 tokens
    assert drafts[1] == []  # sampled nothing this step (a chunked prefill)
    assert drafts[2] == []  # at max_model_len

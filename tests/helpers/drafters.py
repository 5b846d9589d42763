"""Tiny target and draft models, greedy decoding through the engine, and drafters built from config nodes."""

from __future__ import annotations

import torch

from decodelab.config import BackendConfig, DrafterConfig, ModelConfig, StrategyConfig
from decodelab.decoding.engine import decode
from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.drafters.none import NoDrafter
from decodelab.drafters.registry import build_drafter, drafter_config
from decodelab.experiment.runner import eos_ids
from decodelab.models.loading import LoadedModel, load_model

PROMPTS = [
    "Summarize: the quick brown fox jumps over the lazy dog, again and again, near the river bank.",
    "What is 12 times 7? Explain step by step.",
]
GREEDY = LogitsPipeline(StrategyConfig())
TINY = dict(name="tiny-random", source="tiny_random")


def tiny_model(**fields) -> LoadedModel:
    return load_model(ModelConfig(**{**TINY, **fields}), BackendConfig())




def decode_with(loaded, ids, drafter, max_new_tokens=40, pipeline=GREEDY, cache="auto", linear="torch"):
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    return decode(LMAdapter(loaded.model, cache=cache, linear=linear), ids, pipeline=pipeline, drafter=drafter, stop=stop,
                  generator=torch.Generator().manual_seed(0))


def ar_tokens(loaded, ids, max_new_tokens=40):
    return decode_with(loaded, ids, NoDrafter(DrafterConfig()), max_new_tokens).tokens


def make_drafter(loaded, node, pipeline=GREEDY, backend=None, **parts):
    cfg = drafter_config(node)
    cfg.validate("drafter")
    return build_drafter(cfg, target=LMAdapter(loaded.model), loaded=loaded, pipeline=pipeline,
                         backend=backend or BackendConfig(), **parts)


def draft_model_node(draft_fields=None, **fields):
    return {"name": "draft_model", "model": {**TINY, **(draft_fields or {})}, **fields}

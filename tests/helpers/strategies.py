"""Decode one prompt with a composed strategy, outside a run: what the strategy tests share."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from decodelab.config import BackendConfig, DrafterConfig
from decodelab.decoding.lm import LMAdapter
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Generation
from decodelab.drafters.none import NoDrafter
from decodelab.experiment.compose import compose, to_run_config
from decodelab.experiment.runner import eos_ids
from decodelab.strategies.base import Strategy
from decodelab.strategies.registry import build_strategy


def strategy_for(loaded, overrides: Sequence[str]) -> Strategy:
    """The strategy ``overrides`` compose to (``strategy=<name> strategy.<key>=...``), built on ``loaded``."""
    run = to_run_config(compose([*overrides, "tracking=none", "output_dir=unused"]))
    return build_strategy(run.strategy, loaded=loaded, backend=BackendConfig())


def generate(loaded, strategy: Strategy, ids: Sequence[int], max_new_tokens: int, drafter=None,
             plain_ids: Optional[List[int]] = None, seed: int = 0, target=None) -> Generation:
    """One prompt through ``strategy`` the way the runner does it: wrap, begin, generate."""
    if target is None:
        target = strategy.wrap(LMAdapter(loaded.model, hidden_states=strategy.hidden_states))
    strategy.begin(ids, plain_ids)
    target.reset()
    stop = StopCriteria(loaded.tokenizer, eos_ids(loaded), [], max_new_tokens)
    return strategy.generate(target, ids, pipeline=LogitsPipeline(strategy.cfg), drafter=drafter or NoDrafter(DrafterConfig()),
                             stop=stop, generator=torch.Generator().manual_seed(seed))

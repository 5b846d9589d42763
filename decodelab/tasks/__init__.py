"""Tasks: turn a TaskConfig into the list of prompts a run decodes (sources: decodelab/tasks/registry.py).

Every source yields ``Prompt`` objects; selection (categories, shuffle, limit, max_turns) is applied here,
in that order, so it behaves the same for every source.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import List

from decodelab.config import TaskConfig
from decodelab.errors import ConfigError, check
from decodelab.tasks.base import Prompt

__all__ = ["Prompt", "load_task", "select"]



def load_task(cfg: TaskConfig) -> List[Prompt]:
    """Load the prompts of ``cfg.source`` and apply the config's selection."""
    from decodelab.tasks.registry import SOURCES

    loader = SOURCES.get(cfg.source)
    if loader is None:
        raise ConfigError("task.source", f"got {cfg.source!r}, allowed: {', '.join(SOURCES)}")
    return select(loader(cfg), cfg)


def select(prompts: List[Prompt], cfg: TaskConfig) -> List[Prompt]:
    """Filter by category, shuffle (seeded), cut to ``limit``, truncate turns to ``max_turns``."""
    if cfg.categories is not None:
        prompts = _filter_categories(prompts, list(cfg.categories))
    if cfg.shuffle_seed is not None:
        prompts = list(prompts)
        random.Random(cfg.shuffle_seed).shuffle(prompts)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if cfg.max_turns is not None:
        prompts = [replace(p, turns=p.turns[: cfg.max_turns]) for p in prompts]
    return prompts


def _filter_categories(prompts: List[Prompt], wanted: List[str]) -> List[Prompt]:
    """Keep prompts of the wanted categories; a typo fails loudly instead of selecting nothing."""
    available = list(dict.fromkeys(p.category for p in prompts))
    check(len(wanted) > 0, "task.categories", f"must name at least one category or be null, available: "
          f"{', '.join(available)}")
    for name in wanted:
        check(name in available, "task.categories", f"unknown category {name!r}, available: {', '.join(available)}")
    keep = set(wanted)
    return [p for p in prompts if p.category in keep]

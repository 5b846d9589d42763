"""Context-aware decoding, CAD (Shi et al.): the output with the context against the output without it.

Scores are ``(1 + alpha) * logits(context + question) - alpha * logits(question)``: tokens the context makes more
likely gain, prior knowledge that ignores the context loses. The context is the part of the first turn the task
marks (``Prompt.context``: specbench-mini's summarization and RAG prompts, a jsonl line's ``context`` field); the
second pass runs the same conversation with it cut out, in a second cache of the same model. A drafter is
verified against these scores (lossless for CAD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from decodelab.config import StrategyConfig
from decodelab.decoding.lm import LMAdapter
from decodelab.errors import ConfigError, check
from decodelab.strategies.scorer import Combine, PairStrategy, contrast

# What a prompt without a context gets: refuse (the run stops at validation) or plain (no contrast).
NO_CONTEXT = ("refuse", "plain")


@dataclass
class CadConfig(StrategyConfig):
    name: str = "cad"
    alpha: float = 0.5
    no_context: str = "refuse"

    def validate(self, key: str = "strategy") -> None:
        super().validate(key)
        check(self.alpha >= 0, f"{key}.alpha", f"must be >= 0 (0 is plain decoding), got {self.alpha}")
        check(self.no_context in NO_CONTEXT, f"{key}.no_context",
              f"got {self.no_context!r}, allowed: {', '.join(NO_CONTEXT)}")


class ContextAwareDecoding(PairStrategy):
    names = ("cad",)
    config_class = CadConfig
    uses_context = True

    @classmethod
    def check_prompts(cls, cfg: CadConfig, prompts: List) -> None:
        bare = [p for p in prompts if not p.context]
        if bare and cfg.no_context == "refuse":
            with_context = sorted({p.category for p in prompts if p.context})
            hint = f"task.categories=[{','.join(with_context)}]" if with_context else "a task whose prompts mark one"
            raise ConfigError("strategy", f"strategy=cad contrasts each prompt with its context, but {len(bare)} of "
                                          f"{len(prompts)} prompts have none (e.g. id {bare[0].id}, category "
                                          f"{bare[0].category}); use {hint}, or strategy.no_context=plain")

    def other_model(self, target: LMAdapter):
        return target.model  # the same model, in a second cache, over the prompt without its context

    def combine(self) -> Combine:
        return contrast(self.cfg.alpha)  # type: ignore[attr-defined]

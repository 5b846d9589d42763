"""Context-aware decoding, CAD (Shi et al.): the output with the context against the output without it.

Scores are ``(1 + alpha) * logits(context + question) - alpha * logits(question)``: tokens the context makes more
likely gain, prior knowledge that ignores the context loses. The context is the part of the first turn the task
marks (``Prompt.context``: specbench-mini's summarization and RAG prompts, a jsonl line's ``context`` field); the
second pass runs the same conversation with it cut out, in a second cache of the same model. A drafter is
verified against these scores (lossless for CAD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from decodelab.config import StrategyConfig
from decodelab.decoding.lm import LMAdapter
from decodelab.errors import ConfigError, check
from decodelab.strategies.base import Strategy
from decodelab.strategies.scorer import PairScorer, contrast

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


class ContextAwareDecoding(Strategy):
    names = ("cad",)
    config_class = CadConfig
    uses_context = True

    def __init__(self, cfg: CadConfig, *, loaded=None, backend=None):
        super().__init__(cfg, loaded=loaded, backend=backend)
        self.backend = backend
        self.scorer: Optional[PairScorer] = None

    @classmethod
    def check_prompts(cls, cfg: CadConfig, prompts: List) -> None:
        bare = [p for p in prompts if not p.context]
        if bare and cfg.no_context == "refuse":
            with_context = sorted({p.category for p in prompts if p.context})
            hint = f"task.categories=[{','.join(with_context)}]" if with_context else "a task whose prompts mark one"
            raise ConfigError("strategy", f"strategy=cad contrasts each prompt with its context, but {len(bare)} of "
                                          f"{len(prompts)} prompts have none (e.g. id {bare[0].id}, category "
                                          f"{bare[0].category}); use {hint}, or strategy.no_context=plain")

    def wrap(self, target: LMAdapter) -> PairScorer:
        cfg: CadConfig = self.cfg  # type: ignore[assignment]
        other = LMAdapter(target.model, cache=self.backend.kv_cache, compile=self.backend.compile)
        self.scorer = PairScorer(target, other, contrast(cfg.alpha))
        return self.scorer

    def prepare(self, slots: int) -> float:
        return self.scorer.other.reserve(slots) if self.scorer is not None else 0.0

    def begin(self, prompt_ids: Sequence[int], plain_ids: Optional[Sequence[int]]) -> None:
        if self.scorer is not None:
            self.scorer.begin(prompt_ids, plain_ids)

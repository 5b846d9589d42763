"""The strategy interface: what is decoded, beside the drafter (who proposes) and the verifier (who judges).

Three kinds, one interface:
- the sampling family (greedy, sample, top_p, min_p) is the engine's loop under the run's logits pipeline;
- contrast strategies (contrastive decoding, DoLa, CAD) change the scores the target gives, by wrapping the
  target in a :class:`decodelab.strategies.scorer.Scorer` that the same loop, the AR baseline and the verifier
  use; a drafter then accelerates the contrasted distribution losslessly;
- search strategies (the beam family, contrastive search, MBR) run a loop of their own.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from decodelab.config import BackendConfig, StrategyConfig
from decodelab.decoding.engine import decode
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Generation, Proposer


class Strategy:
    """Base class and the sampling family: the engine's decode loop, unchanged."""

    # The strategy.name values this class serves (the registry's keys); the base class serves the sampling family.
    names: Tuple[str, ...] = ("greedy", "sample", "top_p", "min_p")
    # The dataclass (a StrategyConfig subclass) that types this strategy's config node.
    config_class: type = StrategyConfig
    # Why no drafter can run with this strategy; None: drafts are verified against the strategy's own scores,
    # so the output equals the strategy's without a drafter.
    drafter_conflict: Optional[str] = None
    # The strategy contrasts each prompt with its context removed: the task must mark the context.
    uses_context: bool = False
    # The strategy reads the target's residual stream (LMAdapter(hidden_states=True)).
    hidden_states: bool = False

    def __init__(self, cfg: StrategyConfig, *, loaded=None, backend: Optional[BackendConfig] = None):
        self.cfg = cfg

    @classmethod
    def models(cls, cfg: StrategyConfig) -> List:
        """Model configs the strategy loads besides the target (contrastive decoding's amateur)."""
        return []

    @classmethod
    def check_prompts(cls, cfg: StrategyConfig, prompts: List) -> None:
        """Refuse a task this strategy cannot decode (ConfigError), before any model loads."""

    def wrap(self, target):
        """The scorer the run decodes with: the target itself, or a contrast of it (contrast strategies)."""
        return target

    def begin(self, prompt_ids: Sequence[int], plain_ids: Optional[Sequence[int]]) -> None:
        """A prompt is about to be decoded; ``plain_ids`` are its ids with the context removed (None where the
        strategy does not use them, or the prompt has no context)."""

    def prepare(self, slots: int) -> float:
        """Before anything is timed, with room for ``slots`` cached tokens: whatever the strategy's first call would
        otherwise pay inside a sample (a contrast's second cache needs nothing here: the wrapped target's
        ``reserve`` sizes both); returns the seconds compiling took."""
        return 0.0

    def generate(self, target, prompt_ids: Sequence[int], *, pipeline: LogitsPipeline, drafter: Proposer,
                 stop: StopCriteria, generator: torch.Generator) -> Generation:
        """Decode one prompt with the (wrapped) target."""
        return decode(target, prompt_ids, pipeline=pipeline, drafter=drafter, stop=stop, generator=generator)

"""Verifiers (acceptance rules): given a draft and the target's logits over it, which tokens to keep.

Knows nothing of who drafted. ``logits`` has one row per position: row i is the target's prediction
after the context plus the first i draft tokens, so a draft of k tokens comes with k + 1 rows and the
last accepted row yields the bonus token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from decodelab.drafters.base import Draft
from decodelab.errors import ConfigError
from decodelab.sampling import ChainContext, LogitsPipeline


@dataclass
class Verdict:
    accepted: List[int]
    bonus: int


def verify(draft: Draft, logits: torch.Tensor, pipeline: LogitsPipeline, generator: torch.Generator,
           context: Sequence[int]) -> Verdict:
    seen = chain_context(context, draft.tokens, logits.device) if pipeline.penalty != 1.0 else None
    if pipeline.greedy:
        return verify_greedy(draft.tokens, pipeline.process(logits, seen).argmax(dim=-1).tolist())
    if len(draft) == 0:
        return Verdict(accepted=[], bonus=int(pipeline.sample(logits[:1], generator, seen)[0]))
    raise ConfigError("strategy.do_sample", "speculative sampling with a drafter is not available yet; "
                      "use strategy=greedy or drafter=none")


def verify_greedy(draft: Sequence[int], target_choice: Sequence[int]) -> Verdict:
    """Exact match: keep draft tokens while they equal the target's argmax; the first disagreement is the bonus."""
    accepted: List[int] = []
    for proposed, chosen in zip(draft, target_choice):
        if proposed != chosen:
            break
        accepted.append(proposed)
    return Verdict(accepted=accepted, bonus=int(target_choice[len(accepted)]))


def chain_context(context: Sequence[int], draft: Sequence[int], device: torch.device) -> ChainContext:
    """The ids each logits row follows (repetition penalty needs them): context + draft[:i] for row i."""
    return ChainContext(prefix=torch.tensor(list(context), dtype=torch.long, device=device),
                        draft=torch.tensor(list(draft), dtype=torch.long, device=device))

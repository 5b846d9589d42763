"""The drafter interface: propose tokens; learn from what the verifier accepted. Knows nothing of verification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class Draft:
    """Proposed tokens: a chain (``parents`` None) or a token tree.

    ``parents[i]`` is the index of token i's parent in ``tokens``, -1 for a child of the root (the last
    committed token); parents come first (``parents[i] < i``). See :mod:`decodelab.decoding.tree`.
    """

    tokens: List[int]
    # Draft distributions [len(tokens), vocab] for lossless speculative sampling: row i is the distribution
    # token i was drawn from (in a tree: the one at its parent), built by the run's LogitsPipeline.
    # None for deterministic drafters (treated as one-hot on the proposed token).
    probs: Optional[torch.Tensor] = None
    forwards: int = 0
    parents: Optional[List[int]] = None

    def __len__(self) -> int:
        return len(self.tokens)


class Drafter:
    """Base class; ``none`` proposes nothing, which makes the engine plain autoregressive decoding."""

    # The registry key (drafter.name in configs); the base class has none and is not registered.
    name: str = ""
    lossy = False
    # The dataclass (a DrafterConfig subclass) that types this drafter's config node.
    config_class: type = object

    def reset(self, prompt_ids: Sequence[int]) -> None:
        """A new sequence starts (or a new turn re-uses an edited context)."""

    def propose(self, context: Sequence[int]) -> Draft:
        raise NotImplementedError

    def observe(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """The target's raw float32 logits [len(tokens), vocab] from a verification forward over
        ``tokens`` = [root] + draft tokens; row i predicts what follows the path root -> tokens[i]."""

    def update(self, drafted: int, accepted: int) -> None:
        """Feedback after verification, for adaptive drafters."""

"""The drafter interface: propose tokens; learn from what the verifier accepted. Knows nothing of verification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class Draft:
    tokens: List[int]
    # Draft distributions [len(tokens), vocab] for lossless speculative sampling; None for deterministic drafters.
    probs: Optional[torch.Tensor] = None
    forwards: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


class Drafter:
    """Base class; ``none`` proposes nothing, which makes the engine plain autoregressive decoding."""

    lossy = False

    def reset(self, prompt_ids: Sequence[int]) -> None:
        """A new sequence starts (or a new turn re-uses an edited context)."""

    def propose(self, context: Sequence[int]) -> Draft:
        raise NotImplementedError

    def update(self, drafted: int, accepted: int) -> None:
        """Feedback after verification, for adaptive drafters."""

"""The drafter interface: propose tokens; learn from what the verifier accepted. Knows nothing of verification."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from decodelab.decoding.types import Draft


class Drafter:
    """Base class; ``none`` proposes nothing, which makes the engine plain autoregressive decoding."""

    # The registry key (drafter.name in configs); the base class has none and is not registered.
    name: str = ""
    # The dataclass (a DrafterConfig subclass) that types this drafter's config node.
    config_class: type = object
    # The config field (below drafter.) that holds the draft length, for reports; None: no such field.
    draft_length_key: Optional[str] = None
    # Offline replay (decodelab simulate): the default grid of a model-free drafter ({}: it needs a model),
    # and whether the replay reproduces the real run's steps exactly or only approximately.
    simulation_grid: Dict[str, List[Any]] = {}
    replay_exact: bool = False
    # Whether the draft is a function of the context alone (no model, no feedback, no state across requests):
    # such a drafter can also run inside another engine's worker (engine=vllm engine.proposer=decodelab).
    context_only: bool = False

    def reset(self, prompt_ids: Sequence[int]) -> None:
        """A new sequence starts (or a new turn re-uses an edited context)."""

    def propose(self, context: Sequence[int]) -> Draft:
        raise NotImplementedError

    def observe(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """The target's raw float32 logits [len(tokens), vocab] from a verification forward over
        ``tokens`` = [root] + draft tokens; row i predicts what follows the path root -> tokens[i]."""

    def update(self, drafted: int, accepted: int) -> None:
        """Feedback after verification, for adaptive drafters."""

    def prepare(self, slots: int) -> float:
        """Before anything is timed: room for ``slots`` cached tokens in the drafter's own model, and (first call,
        ``backend.compile``) its compiled steps; returns the seconds compiling took. Model-free drafters: 0."""
        return 0.0

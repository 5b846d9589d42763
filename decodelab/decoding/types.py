"""The records the decoding core passes around: a draft, a verdict, one step, one generation, the
interface the engine asks of a proposer (implemented by decodelab.drafters.base.Drafter) and the one it
asks of a kernel provider (implemented in decodelab.kernels.provider)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Sequence, Tuple

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


@dataclass
class Verdict:
    """What verification kept of a draft.

    ``accepted`` are draft tokens the rule kept (a root-to-node path for trees); ``bonus`` is the token
    the target adds after them: drawn from the residual distribution where a draft token was rejected
    (recovered), or from the target's own distribution when every token was accepted.
    """

    accepted: List[int]
    bonus: int
    # Draft indices of the accepted tokens (a root-to-node path for trees; 0..len-1 for chains).
    nodes: List[int] = field(default_factory=list)
    # True when a lossy rule (typical acceptance) judged a non-empty draft.
    lossy: bool = False


@dataclass
class StepRecord:
    """One verification step. On disk (``samples.jsonl``) it is the list
    ``[drafted, accepted, bonus, draft_s, verify_s, depth]``; records written before ``depth`` existed
    have five elements and are chains, whose depth is ``drafted``."""

    drafted: int  # draft tokens verified (a tree's node count)
    accepted: int
    bonus: int
    draft_s: float
    verify_s: float
    depth: int  # the draft's longest path: its length for a chain, the deepest node's depth for a tree

    def to_list(self, digits: Optional[int] = 6) -> list:
        """The on-disk form; times rounded to ``digits`` (None: as measured)."""
        draft_s, verify_s = (self.draft_s, self.verify_s) if digits is None else \
            (round(self.draft_s, digits), round(self.verify_s, digits))
        return [self.drafted, self.accepted, self.bonus, draft_s, verify_s, self.depth]

    @classmethod
    def from_list(cls, row: Sequence[float]) -> "StepRecord":
        drafted = int(row[0])
        return cls(drafted, int(row[1]), int(row[2]), float(row[3]), float(row[4]),
                   int(row[5]) if len(row) > 5 else drafted)


@dataclass
class Generation:
    tokens: List[int]
    stop_reason: str  # eos | stop_string | max_new_tokens
    ttft_s: float
    wall_s: float
    steps: List[StepRecord] = field(default_factory=list)
    target_forwards: int = 0
    draft_forwards: int = 0
    # Forwards of a second model or pass the strategy contrasts with (an amateur, the context-free prompt).
    aux_forwards: int = 0
    # True when any step used a lossy acceptance rule (typical acceptance): the output does not follow
    # the target distribution, and every record of this generation must say so.
    lossy: bool = False


class Proposer(Protocol):
    """What the engine needs of a drafter; it knows nothing of verification."""

    def reset(self, prompt_ids: Sequence[int]) -> None: ...

    def propose(self, context: Sequence[int]) -> Draft: ...

    def observe(self, tokens: Sequence[int], logits: torch.Tensor) -> None: ...

    def update(self, drafted: int, accepted: int) -> None: ...


class Kernels(Protocol):
    """Device kernels the core hands its hot paths to: the fused sampling filters and the rejection samplers.

    The core draws every random number itself, from the caller's generator and in the order its torch path
    draws them (uniforms for the acceptance tests, Exp(1) noise for the one token drawn by the exponential
    race ``argmax(probs / noise)``, which is what ``torch.multinomial(probs, 1)`` computes), and passes them
    in: a provider changes where the arithmetic runs, never which tokens a seed gives. Batched shapes: B
    rows, K draft tokens (N tree nodes), V vocabulary entries; ``noise`` is [B, V].
    """

    name: str

    def warp(self, logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, min_p: float,
             noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Probabilities [B, V] after temperature, top-k, top-p, min-p (disabled at 1, 0, 1, 0), and the
        token [B] the race with ``noise`` picks (None without noise)."""
        ...

    def chain(self, draft_ids: torch.Tensor, target: torch.Tensor, draft_probs: Optional[torch.Tensor],
              uniforms: Optional[torch.Tensor], noise: Optional[torch.Tensor], *,
              greedy: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Verify chains [B, K] against target rows [B, K + 1, V]: (tokens [B, K + 1] = the accepted ones, then
        the recovered or bonus token, then -1; the number accepted [B])."""
        ...

    def tree(self, tokens: torch.Tensor, parents: torch.Tensor, target: torch.Tensor,
             draft_probs: Optional[torch.Tensor], uniforms: Optional[torch.Tensor], noise: Optional[torch.Tensor],
             *, greedy: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Verify token trees [B, N] (parents as in decodelab.decoding.tree) against rows [B, N + 1, V]:
        (accepted node indices [B, N], root first, then -1; the number accepted [B]; the token after them [B])."""
        ...

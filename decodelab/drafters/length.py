"""Draft-length controllers: how many tokens a model-based drafter proposes each step.

One tiny interface, shared by every drafter that drafts token by token (draft_model, layer_skip):

- ``next_length()``: the most tokens to draft this step (>= 1);
- ``keep_drafting(position, draft_prob)``: asked after each drafted token (``position`` counts from 0)
  with the drafter's probability of the token it just drafted; False stops this step's draft;
- ``update(drafted, accepted)``: feedback after verification.

Policies (``drafter.length.policy``):

- ``fixed``: always ``k``.
- ``heuristic``: transformers' assisted-generation schedule ("heuristic" num_assistant_tokens_schedule):
  start at ``k``; when every drafted token was accepted the next draft is 2 longer, otherwise 1 shorter;
  kept within [k_min, k_max].
- ``confidence``: draft up to ``k_max`` tokens but stop as soon as the drafter's probability of its own
  token falls below ``threshold`` (that token is still proposed, as transformers'
  assistant_confidence_threshold does); the confidence-stop idea of CaPE / EAGLE-2 / Kangaroo.
- ``ucb``: a UCB1 bandit (BanditSpec's UCBSpec) over ``candidates``; the reward of a step is the tokens
  it gained per unit of cost, ``(accepted + 1) / (1 + cost_ratio * drafted)`` with ``cost_ratio`` = the
  draft forward's cost relative to the target's, scaled into [0, 1] by the best reward any candidate
  could reach. Deterministic: unplayed arms are tried in the order given, ties go to the first arm.

A controller keeps its state across prompts (what it learned carries over, as transformers keeps the
adjusted num_assistant_tokens on the assistant model); ``reset()`` forgets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

from decodelab.errors import check

POLICIES = ("fixed", "heuristic", "confidence", "ucb")


@dataclass
class DraftLengthConfig:
    # fixed | heuristic | confidence | ucb (see decodelab/drafters/length.py).
    policy: str = "fixed"
    # fixed: the draft length; heuristic: the starting length.
    k: int = 4
    # heuristic bounds; confidence drafts at most k_max tokens.
    k_min: int = 1
    k_max: int = 16
    # confidence: stop once the drafter's probability of its own token is below this.
    threshold: float = 0.4
    # ucb: the draft lengths the bandit chooses among.
    candidates: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    # ucb: cost of one draft forward relative to one target forward (c in Leviathan et al.).
    cost_ratio: float = 0.2

    def set_length(self, length: int) -> None:
        """The run-level draft_length: the fixed length, the heuristic's start, the confidence rule's cap."""
        self.k = length
        self.k_max = max(self.k_max, length) if self.policy != "confidence" else length

    def validate(self, key: str = "drafter.length") -> None:
        check(self.policy in POLICIES, f"{key}.policy", f"got {self.policy!r}, allowed: {', '.join(POLICIES)}")
        check(self.k >= 1, f"{key}.k", f"must be >= 1, got {self.k}")
        check(self.k_min >= 1, f"{key}.k_min", f"must be >= 1, got {self.k_min}")
        check(self.k_max >= self.k_min, f"{key}.k_max", f"must be >= k_min={self.k_min}, got {self.k_max}")
        if self.policy == "heuristic":
            check(self.k_min <= self.k <= self.k_max, f"{key}.k",
                  f"must be within [k_min, k_max] = [{self.k_min}, {self.k_max}] for policy=heuristic, got {self.k}")
        check(0.0 <= self.threshold <= 1.0, f"{key}.threshold", f"must be in [0, 1], got {self.threshold}")
        check(len(self.candidates) >= 1 and all(int(c) >= 1 for c in self.candidates), f"{key}.candidates",
              f"must be a non-empty list of lengths >= 1, got {list(self.candidates)}")
        check(self.cost_ratio >= 0.0, f"{key}.cost_ratio", f"must be >= 0, got {self.cost_ratio}")


class LengthController:
    """Base: a fixed length; subclasses override what they adapt."""

    def __init__(self, cfg: DraftLengthConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        """Forget what was learned."""

    def next_length(self) -> int:
        return self.cfg.k

    def keep_drafting(self, position: int, draft_prob: float) -> bool:
        return True

    def update(self, drafted: int, accepted: int) -> None:
        pass


class FixedLength(LengthController):
    pass


class HeuristicLength(LengthController):
    """transformers' +2 / -1 schedule."""

    def reset(self) -> None:
        self.k = self.cfg.k

    def next_length(self) -> int:
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        if accepted >= drafted:
            self.k = min(self.k + 2, self.cfg.k_max)
        else:
            self.k = max(self.k - 1, self.cfg.k_min, 1)


class ConfidenceLength(LengthController):
    """Draft while the drafter is confident, at most k_max tokens."""

    def next_length(self) -> int:
        return self.cfg.k_max

    def keep_drafting(self, position: int, draft_prob: float) -> bool:
        return draft_prob >= self.cfg.threshold


class UCBLength(LengthController):
    """UCB1 over candidate lengths; reward = tokens gained per unit cost, scaled into [0, 1]."""

    def reset(self) -> None:
        self.arms = [int(c) for c in self.cfg.candidates]
        self.counts = [0] * len(self.arms)
        self.totals = [0.0] * len(self.arms)
        self.plays = 0
        self.arm = 0
        c = float(self.cfg.cost_ratio)
        self.best_possible = max((k + 1) / (1 + c * k) for k in self.arms)

    def reward(self, drafted: int, accepted: int) -> float:
        return (accepted + 1) / (1 + self.cfg.cost_ratio * drafted) / self.best_possible

    def next_length(self) -> int:
        for i, n in enumerate(self.counts):
            if n == 0:
                self.arm = i
                return self.arms[i]
        log_plays = math.log(self.plays)
        scores = [self.totals[i] / n + math.sqrt(2 * log_plays / n) for i, n in enumerate(self.counts)]
        self.arm = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return self.arms[self.arm]

    def update(self, drafted: int, accepted: int) -> None:
        self.counts[self.arm] += 1
        self.totals[self.arm] += self.reward(drafted, accepted)
        self.plays += 1

    def means(self) -> List[float]:
        return [t / n if n else 0.0 for t, n in zip(self.totals, self.counts)]


CONTROLLERS = {"fixed": FixedLength, "heuristic": HeuristicLength, "confidence": ConfidenceLength, "ucb": UCBLength}


def build_controller(cfg: DraftLengthConfig) -> LengthController:
    cfg.validate()
    return CONTROLLERS[cfg.policy](cfg)

"""Scorers: a target whose logits are a contrast, behind the adapter's own interface.

The engine, the AR baseline, the divergence probe and the drafters call ``prefill``, ``forward``,
``forward_tree``, ``crop``, ``keep`` and read ``tokens``; a scorer answers them with contrasted logits, so a
drafter's tokens are verified against the contrasted distribution (lossless for it) with no change to the loop.

- :class:`PairScorer` runs a second adapter beside the target over the same new tokens: contrastive decoding's
  amateur (same prompt), or context-aware decoding's context-free pass (the prompt without its context: the second
  cache is shorter by a fixed offset, which ``crop`` and ``keep`` apply).
- :class:`LayerScorer` contrasts the target's final layer with a premature one from the same forward (DoLa).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

from decodelab.decoding.lm import LMAdapter, common_prefix
from decodelab.strategies.base import Strategy

# (main logits [rows, vocab], other logits [rows, vocab]) -> scores [rows, vocab]
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def contrast(weight: float, cutoff: float = 0.0) -> Combine:
    """``(1 + weight) * main - weight * other``; with ``cutoff`` > 0, tokens whose main probability is below
    ``cutoff`` times the top one's are removed (-inf): the adaptive plausibility constraint of contrastive
    decoding (Li et al.), which keeps the contrast from promoting tokens the main model finds implausible."""
    def combine(main: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        scores = (1 + weight) * main - weight * other
        return plausible(main, scores, cutoff) if cutoff > 0 else scores
    return combine


def plausible(main: torch.Tensor, scores: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``scores`` with -inf where ``log_softmax(main) < log(cutoff) + max``: at least the top token stays."""
    log_probs = torch.log_softmax(main, dim=-1)
    keep = log_probs >= log_probs.max(dim=-1, keepdim=True).values + math.log(cutoff)
    return scores.masked_fill(~keep, float("-inf"))


class Scorer:
    """The target's interface over ``main`` (an LMAdapter): what a scorer does not change, it delegates."""

    def __init__(self, main: LMAdapter):
        self.main = main

    @property
    def model(self):
        return self.main.model

    @property
    def device(self) -> torch.device:
        return self.main.device

    @property
    def tokens(self) -> List[int]:
        return self.main.tokens

    @property
    def forwards(self) -> int:
        return self.main.forwards

    @property
    def aux_forwards(self) -> int:
        return self.main.aux_forwards

    @property
    def kind(self) -> str:
        return self.main.kind

    @property
    def linear(self) -> str:
        return self.main.linear

    @property
    def features(self) -> torch.Tensor:
        """The main model's features (feature-level drafters draft from the target's own states)."""
        return self.main.features

    def check_features(self) -> None:
        self.main.check_features()

    def check_tree_support(self) -> None:
        self.main.check_tree_support()

    def reserve(self, length: int) -> float:
        return self.main.reserve(length)

    def warmup(self, sizes: Sequence[int]) -> float:
        return self.main.warmup(sizes)

    def reset(self) -> None:
        self.main.reset()

    def crop(self, length: int) -> None:
        self.main.crop(length)

    def keep(self, indices: Sequence[int]) -> None:
        self.main.keep(indices)

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """As LMAdapter.prefill: the cache holds ``ids``; the scores that follow the last one."""
        ids = list(ids)
        keep = min(common_prefix(self.tokens, ids), len(ids) - 1)
        self.crop(keep)
        return self.forward(ids[keep:], last_only=True)[-1]

    def forward(self, ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError


class PairScorer(Scorer):
    """``combine(main, other)`` of two adapters run over the same new tokens. The other adapter's cache holds
    :meth:`begin`'s ``plain`` prompt where the main one holds ``prompt`` (the same ids for contrastive decoding),
    then the same tokens."""

    def __init__(self, main: LMAdapter, other: LMAdapter, combine: Combine):
        super().__init__(main)
        self.other = other
        self.combine = combine
        self.prompt: List[int] = []
        self.plain: List[int] = []
        # Off: the scores are the main adapter's alone and the other one is not run (CAD on a prompt without a
        # context, strategy.no_context=plain).
        self.active = True

    @property
    def aux_forwards(self) -> int:
        return self.other.forwards

    def begin(self, prompt: Sequence[int], plain: Optional[Sequence[int]], active: bool = True) -> None:
        """The next prompt and its counterpart for the other adapter (None: the same ids); ``active`` False
        decodes it without the contrast."""
        self.prompt = list(prompt)
        self.plain = list(plain) if plain is not None else list(prompt)
        self.active = active

    @property
    def offset(self) -> int:
        return len(self.prompt) - len(self.plain)

    def reserve(self, length: int) -> float:
        return self.main.reserve(length) + self.other.reserve(length)

    def warmup(self, sizes: Sequence[int]) -> float:
        return self.main.warmup(sizes) + self.other.warmup(sizes)

    def reset(self) -> None:
        self.main.reset()
        self.other.reset()

    def crop(self, length: int) -> None:
        self.main.crop(length)
        if self.active:
            self.other.crop(self._other_length(length))

    def keep(self, indices: Sequence[int]) -> None:
        indices = list(indices)
        self.main.keep(indices)
        if not self.active:
            return
        head = len(self.prompt)
        if indices[:head] != list(range(min(head, len(indices)))):
            raise ValueError("a contrast scorer keeps the whole prompt: positions before it cannot be dropped")
        self.other.keep(list(range(self._other_length(min(head, len(indices)))))
                        + [i - self.offset for i in indices[head:]])

    def _other_length(self, length: int) -> int:
        """The other cache's length when the main one holds ``length`` (both hold at least their prompt's
        start; within the prompt only a full prompt maps, anything shorter maps to the same length)."""
        return length - self.offset if length >= len(self.prompt) else min(length, len(self.plain))

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        ids = list(ids)
        if not self.active:
            return self.main.prefill(ids)
        if ids[:len(self.prompt)] != self.prompt:
            self.begin(ids, None)  # not the prompt begin() announced: both adapters see the same ids
        keep = min(common_prefix(self.main.tokens, ids), len(ids) - 1)
        other_ids = self.plain + ids[len(self.prompt):]
        other_keep = min(common_prefix(self.other.tokens, other_ids), len(other_ids) - 1)
        self.main.crop(keep)
        self.other.crop(other_keep)
        main = self.main.forward(ids[keep:], last_only=True)[-1:]
        other = self.other.forward(other_ids[other_keep:], last_only=True)[-1:]
        return self.combine(main, other)[0]

    def forward(self, ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        main = self.main.forward(ids, last_only=last_only)
        if not self.active:
            return main
        return self.combine(main, self.other.forward(ids, last_only=last_only))

    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        main = self.main.forward_tree(tokens, parents)
        if not self.active:
            return main
        return self.combine(main, self.other.forward_tree(tokens, parents))


class LayerScorer(Scorer):
    """DoLa: the final layer's log-probabilities minus those of the premature layer (among ``layers``, indices of
    the residual stream: 0 the embeddings, i the output of decoder layer i) farthest from them in Jensen-Shannon
    divergence, chosen per position, under the plausibility cutoff ``cutoff`` on the final layer. Premature
    layers go through the final norm and the LM head (the logit lens)."""

    def __init__(self, main: LMAdapter, layers: Sequence[int], cutoff: float):
        super().__init__(main)
        self.layers = list(layers)
        self.cutoff = cutoff

    def forward(self, ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        return self._contrast(self.main.forward(ids), last_only)

    def forward_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        return self._contrast(self.main.forward_tree(tokens, parents), False)

    def _contrast(self, final: torch.Tensor, last_only: bool) -> torch.Tensor:
        stream = self.main.hidden_states
        rows = slice(-1, None) if last_only else slice(None)
        final = final[rows]
        head, norm = self.model.lm_head, self.model.model.norm
        with torch.inference_mode():
            premature = torch.stack([head(norm(stream[i][rows])).float() for i in self.layers])  # [L, rows, V]
        final_logp = torch.log_softmax(final, dim=-1)
        early_logp = torch.log_softmax(premature, dim=-1)
        if len(self.layers) > 1:
            mean = 0.5 * (final_logp.exp()[None] + early_logp.exp())
            log_mean = mean.clamp_min(1e-30).log()
            jsd = 0.5 * ((final_logp.exp()[None] * (final_logp[None] - log_mean)).sum(-1)
                         + (early_logp.exp() * (early_logp - log_mean)).sum(-1))  # [L, rows]
            chosen = jsd.argmax(dim=0)
            base = early_logp[chosen, torch.arange(final.size(0))]
        else:
            base = early_logp[0]
        return plausible(final, final_logp - base, self.cutoff)


class PairStrategy(Strategy):
    """A strategy that contrasts the target with a second adapter through a :class:`PairScorer`: subclasses say
    which model the second adapter runs and how the two are combined."""

    def __init__(self, cfg, *, loaded=None, backend=None):
        super().__init__(cfg, loaded=loaded, backend=backend)
        self.backend = backend
        self.scorer: Optional[PairScorer] = None

    def other_model(self, target: LMAdapter):
        raise NotImplementedError

    def combine(self) -> Combine:
        raise NotImplementedError

    def wrap(self, target: LMAdapter) -> PairScorer:
        other = LMAdapter(self.other_model(target), cache=self.backend.kv_cache, compile=self.backend.compile,
                          linear=self.backend.linear)
        self.scorer = PairScorer(target, other, self.combine())
        return self.scorer

    def begin(self, prompt_ids: Sequence[int], plain_ids: Optional[Sequence[int]]) -> None:
        if self.scorer is not None:
            # A context strategy on a prompt without one (allowed by its config) decodes it without the contrast.
            self.scorer.begin(prompt_ids, plain_ids if self.uses_context else None,
                              active=plain_ids is not None or not self.uses_context)

"""The torch reference of :mod:`decodelab.kernels.logits`: the pipeline's own filters, composed the same way.

Built from the functions of :mod:`decodelab.decoding.logits`, so the reference is by construction what
``LogitsPipeline.probs`` computes for a strategy with these four filters (a test checks that too), and
``torch.multinomial`` is the race :func:`race_sample` runs.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from decodelab.decoding.logits import apply_min_p, apply_temperature, apply_top_k, apply_top_p


def reference_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> torch.Tensor:
    """Probabilities [rows, V] after temperature, top-k, top-p, min-p, each active as in ``LogitsPipeline``."""
    x = logits.float()
    if temperature != 1.0:
        x = apply_temperature(x, temperature)
    if top_k > 0:
        x = apply_top_k(x, top_k)
    if top_p < 1.0:
        x = apply_top_p(x, top_p)
    if min_p > 0.0:
        x = apply_min_p(x, min_p)
    return x.softmax(dim=-1)


def reference_warp(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What :func:`decodelab.kernels.logits.fused_probs` returns: the probabilities, and the race's tokens."""
    probs = reference_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return probs, None if noise is None else race_sample(probs, noise)


def race_sample(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``argmax(probs / noise)`` along the last dimension: a draw from ``probs`` given Exp(1) ``noise``.

    Identical to ``torch.multinomial(probs, 1, generator=g)`` when ``noise`` is
    ``empty_like(probs).exponential_(generator=g)`` from the same state: that is how torch draws one sample.
    """
    return (probs / noise).argmax(dim=-1)


def racer(noise: torch.Tensor) -> Callable[[torch.Tensor], int]:
    """A one-token sampler over a given noise row [V], in the form the verifier's rules take."""
    return lambda dist: int(race_sample(dist, noise))

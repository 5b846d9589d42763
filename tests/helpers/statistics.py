"""Distribution checks for lossless sampling: a chi-square test plus total variation."""

from __future__ import annotations

from typing import Sequence

import torch


def token_counts(samples: Sequence[int], bins: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(list(samples)), minlength=bins).double()


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs``; bins expected below 5 draws are pooled.

    Tokens with probability 0 must never appear (asserted here): that is where a filter mismatch
    between plain sampling and verification would show first.
    """
    counts, probs = counts.double().flatten(), probs.double().flatten()
    assert counts[probs == 0].sum() == 0, "emitted a token the target distribution removed"
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor((len(obs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def assert_follows(samples: Sequence[int], probs: torch.Tensor, max_tv: float = 0.03) -> None:
    counts = token_counts(samples, probs.numel())
    pvalue = chi_square_pvalue(counts, probs)
    tv = 0.5 * float((counts / counts.sum() - probs.double().flatten()).abs().sum())
    assert pvalue > 1e-3 and tv < max_tv, f"p-value {pvalue:.2e}, TV {tv:.4f}"

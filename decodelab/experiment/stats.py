"""Intervals for the figures a run reports: a speedup is a ratio of throughputs with a bootstrap 95% interval
over samples (README, 'What a run records')."""

from __future__ import annotations

import random
from typing import Dict, Sequence


def bootstrap_speedup(pairs: Sequence[Sequence[float]], rounds: int = 1000, seed: int = 0) -> Dict[str, float]:
    """Ratio of throughputs (spec / baseline) with a bootstrap 95% interval over samples.

    ``pairs``: per sample (spec_tokens, spec_wall_s, base_tokens, base_wall_s).
    """
    def ratio(rows: Sequence[Sequence[float]]) -> float:
        spec = sum(r[0] for r in rows) / max(sum(r[1] for r in rows), 1e-12)
        base = sum(r[2] for r in rows) / max(sum(r[3] for r in rows), 1e-12)
        return spec / base if base > 0 else 0.0

    if not pairs:
        return {}
    rng = random.Random(seed)
    draws = sorted(ratio([pairs[rng.randrange(len(pairs))] for _ in pairs]) for _ in range(rounds))
    return {"speedup": ratio(pairs), "speedup_ci_low": draws[int(0.025 * rounds)],
            "speedup_ci_high": draws[min(rounds - 1, int(0.975 * rounds))]}

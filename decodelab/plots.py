"""Run artifacts a person looks at: the accepted-per-step histogram and per-position acceptance."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence


def acceptance_plots(histogram: Sequence[int], per_position: Sequence[float], out_dir: Path, title: str) -> List[Path]:
    """Write acceptance_histogram.png and per_position_acceptance.png; returns their paths (none if no drafts)."""
    if not per_position:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(histogram)), histogram, color="tab:blue")
    ax.set(xlabel="accepted draft tokens per step", ylabel="steps", title=f"Accepted per step: {title}")
    fig.tight_layout()
    paths.append(out_dir / "acceptance_histogram.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(per_position) + 1), per_position, marker="o", color="tab:green")
    ax.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1.05),
           title=f"Per-position acceptance: {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "per_position_acceptance.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths

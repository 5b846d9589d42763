"""Speed/quality Pareto fronts per category: which strategy|drafter pairs are worth running at all.

A strategy comparison has no single winner: beam search may score higher and decode slower, a drafter may
speed up greedy without changing it. The runs worth keeping are those no other run beats on both quality and
throughput, and that set differs per category (a drafter that copies from the prompt shines on summarization,
not on conversation), so fronts are taken per category, each on the quality metric that category has
(:data:`QUALITY_PREFERENCE`). Everything here takes plain rows; decodelab/analysis/report.py builds them from
a sweep's summary.json files.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from decodelab.experiment import plots

# Per category, the first of these any run has: a reference score where the prompts have one (ROUGE-L for
# summaries, exact match for math and RAG, pass@1 for code), else MAUVE against human references where a run
# recorded it (decodelab/experiment/mauve.py), else distinct-2, the diversity every answer gets (open-ended
# categories have no reference; higher distinct-2 means less looping, not a better answer).
QUALITY_PREFERENCE = ("rouge_l", "chrf", "exact_match", "pass@1", "mauve", "distinct_2")
PLOT_FILE = "pareto_by_category.png"


@dataclass(frozen=True)
class Row:
    """One run in one category."""

    strategy: str
    drafter: str
    category: str
    quality: float
    throughput: float  # new tokens / wall second
    forwards_per_token: Optional[float] = None  # target + auxiliary forwards per new token (cost beside speed)
    metric: str = ""  # the quality metric's summary key
    job: str = ""

    @property
    def label(self) -> str:
        return f"{self.strategy}|{self.drafter}"


def _finite(value: object) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def choose_metric(summaries: Iterable[Mapping[str, object]], category: str) -> Optional[str]:
    """The preferred quality key that at least one summary has for ``category`` (``key/<category>``)."""
    summaries = list(summaries)
    return next((key for key in QUALITY_PREFERENCE
                 if any(_finite(s.get(f"{key}/{category}")) is not None for s in summaries)), None)


def summary_rows(job: str, strategy: str, drafter: str, summary: Mapping[str, object],
                 metrics: Mapping[str, str]) -> List[Row]:
    """The rows of one run's summary.json, one per category of ``metrics`` (category -> quality key) it has."""
    rows = []
    for category, metric in metrics.items():
        quality = _finite(summary.get(f"{metric}/{category}"))
        throughput = _finite(summary.get(f"throughput_tok_s/{category}"))
        if quality is None or throughput is None:
            continue
        target = _finite(summary.get(f"target_forwards_per_token/{category}"))
        aux = _finite(summary.get(f"aux_forwards_per_token/{category}")) or 0.0
        rows.append(Row(strategy, drafter, category, quality, throughput,
                        None if target is None else target + aux, metric, job))
    return rows


def pareto_fronts(rows: Sequence[Row]) -> Dict[str, List[Row]]:
    """Per category, the rows no other row of that category beats on both quality and throughput (at least as
    good on both, better on one), by throughput. Exact ties on both axes are all kept: neither beats the other."""
    by_category: Dict[str, List[Row]] = defaultdict(list)
    for row in rows:
        by_category[row.category].append(row)
    fronts = {}
    for category in sorted(by_category):
        group = by_category[category]
        front = plots.pareto_front([(r.throughput, r.quality) for r in group])
        fronts[category] = [group[i] for i in front]
    return fronts


def _labels(rows: Sequence[Row]) -> List[str]:
    """``strategy|drafter``, with the job name added where two runs of a category share it."""
    counts: Dict[tuple, int] = defaultdict(int)
    for row in rows:
        counts[(row.category, row.label)] += 1
    return [row.label + (f" ({row.job})" if counts[(row.category, row.label)] > 1 and row.job else "")
            for row in rows]


def pareto_plot(rows: Sequence[Row], path: Path, title: str = "Quality vs throughput per category") -> Path:
    """One subplot per category: every run a labelled point, the front red and connected."""
    plt = plots._pyplot()
    fronts = pareto_fronts(rows)
    categories = list(fronts)
    cols = min(3, max(len(categories), 1))
    grid = math.ceil(len(categories) / cols) if categories else 1
    fig, axes = plt.subplots(grid, cols, figsize=(4.6 * cols, 3.8 * grid), squeeze=False)
    labels = dict(zip(map(id, rows), _labels(rows)))
    for ax, category in zip(axes.flat, categories):
        group = [r for r in rows if r.category == category]
        front = fronts[category]
        on_front = {id(r) for r in front}
        ax.scatter([r.throughput for r in group], [r.quality for r in group], color="tab:grey", zorder=2)
        ax.plot([r.throughput for r in front], [r.quality for r in front], color="tab:red", marker="o",
                markersize=7, linewidth=1.5, zorder=3)
        for r in group:
            ax.annotate(labels[id(r)], (r.throughput, r.quality), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small", color="tab:red" if id(r) in on_front else "dimgrey")
        ax.set(title=category, xlabel="throughput (tok/s)", ylabel=group[0].metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(categories):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return plots._save(fig, path)

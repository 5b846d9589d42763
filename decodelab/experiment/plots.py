"""Figures a person looks at instead of logs: acceptance per run, and speed/quality comparisons across a sweep.

Every function writes one PNG (matplotlib's Agg backend: no display needed, safe inside Hydra jobs) and
takes plain numbers, so a run folder and a sweep report draw the same figure from the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

# (x, y, ci_low, ci_high): one point of a line with an error bar; a None bound draws no bar.
ErrorPoint = Tuple[float, float, Optional[float], Optional[float]]
# (label, x, y): one job in a speed/quality plane.
LabelledPoint = Tuple[str, float, float]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps a legend placed outside the axes
    _pyplot().close(fig)
    return path


def _legend(ax, count: int) -> None:
    """Inside the axes for a few series; beside them for many, where it cannot cover the data."""
    if count > 5:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize="small")


def acceptance_plots(histogram: Sequence[int], per_position: Sequence[float], out_dir: Path, title: str) -> List[Path]:
    """Write acceptance_histogram.png and per_position_acceptance.png; returns their paths (none if no drafts)."""
    if not per_position:
        return []
    return [histogram_plot({title: histogram}, out_dir / "acceptance_histogram.png",
                           f"Accepted per step: {title}", normalize=False),
            per_position_plot({title: per_position}, out_dir / "per_position_acceptance.png",
                              f"Per-position acceptance: {title}")]


def _colors(plt, count: int) -> list:
    """Distinct colours for up to 20 series (matplotlib's default cycle repeats after 10)."""
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def histogram_plot(series: Mapping[str, Sequence[int]], path: Path, title: str, normalize: bool = True) -> Path:
    """Accepted draft tokens per step, grouped bars per series; ``normalize`` compares runs of different length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(series), 1)
    colors = _colors(plt, len(series))
    # Trailing bins no series reached (e.g. up to a tree's node count) only squeeze the bars.
    shown = 1 + max((i for counts in series.values() for i, c in enumerate(counts) if c), default=0)
    series = {label: list(counts)[:shown] for label, counts in series.items()}
    for index, (label, counts) in enumerate(series.items()):
        total = sum(counts) or 1
        heights = [c / total for c in counts] if normalize else list(counts)
        offset = (index - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(heights))], heights, width=width, label=label, color=colors[index])
    ax.set(xlabel="accepted draft tokens per step", ylabel="share of steps" if normalize else "steps", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(series) > 1:
        _legend(ax, len(series))
    return _save(fig, path)


def per_position_plot(series: Mapping[str, Sequence[float]], path: Path, title: str) -> Path:
    """Acceptance rate at each draft position (1 = first drafted token), one line per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    single = len(series) == 1
    colors = ["tab:green"] if single else _colors(plt, len(series))
    for (label, rates), color in zip(series.items(), colors):
        ax.plot(range(1, len(rates) + 1), rates, marker="o", markersize=4, label=label, color=color)
    ax.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1.05), title=title)
    ax.grid(alpha=0.3)
    if not single:
        _legend(ax, len(series))
    return _save(fig, path)


def speedup_plot(lines: Mapping[str, Sequence[ErrorPoint]], path: Path, xlabel: str, title: str) -> Path:
    """Speedup over the AR baseline against draft length, one line per drafter, the CI as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in lines.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        low = [max(y - lo, 0.0) if lo is not None else 0.0 for _, y, lo, _ in points]
        high = [max(hi - y, 0.0) if hi is not None else 0.0 for _, y, _, hi in points]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4, label=label)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="AR baseline")
    ax.set(xlabel=xlabel, ylabel="speedup (x, bootstrap 95% CI)", title=title)
    ax.grid(alpha=0.3)
    _legend(ax, len(lines) + 1)
    return _save(fig, path)


def panels_plot(panels: Mapping[str, Mapping[str, Sequence[Tuple[float, float]]]], path: Path, xlabel: str,
                title: str) -> Path:
    """One panel per metric (its y label the key), one line per series, over a shared x (log2 when it doubles)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels.items()):
        for label, points in lines.items():
            points = sorted(points)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        xs = sorted({x for points in lines.values() for x, _ in points})
        if len(xs) > 2 and all(x > 0 for x in xs):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _legend(axes[0][0], len(next(iter(panels.values()), {})))
    return _save(fig, path)


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats on both axes (both maximised), in order of x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)]
    return sorted(front, key=lambda i: points[i])


def pareto_plot(points: Sequence[LabelledPoint], path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Every job as a point; the Pareto-optimal ones highlighted, labelled and connected."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xy = [(x, y) for _, x, y in points]
    front = pareto_front(xy)
    ax.scatter([x for x, _ in xy], [y for _, y in xy], color="tab:grey", label="dominated", zorder=2)
    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="tab:red", marker="o", markersize=8,
            linewidth=1.5, label="Pareto front", zorder=3)
    for i, (label, x, y) in enumerate(points):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize="x-small",
                    color="tab:red" if i in front else "dimgrey")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


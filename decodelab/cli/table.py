"""What a person sees at the end of a run: a per-category table and where the results are."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

from rich.console import Console
from rich.table import Table

from decodelab.config import TrackingConfig

QUALITY_COLUMNS = ("rouge_l", "exact_match", "pass@1", "distinct_2", "repetition_rate")
# Shown when the run had a drafter: (summary key, column title).
SPEC_COLUMNS = (("speedup", "speedup"), ("mean_accepted_length", "tau"), ("acceptance_rate", "alpha"),
                ("lossless_rate", "lossless"))


def summary_table(summary: Dict[str, float]) -> Table:
    categories = sorted(key.split("/", 1)[1] for key in summary if key.startswith("num_samples/"))
    quality = [q for q in QUALITY_COLUMNS if q in summary]
    spec = [(key, title) for key, title in SPEC_COLUMNS if key in summary]
    table = Table(title="decodelab results", show_lines=False)
    for column in ("category", "n", "tok/s", "mean tok/s", "TTFT ms", "TPOT ms", "new tokens",
                   *(title for _, title in spec), *quality):
        table.add_column(column, justify="left" if column == "category" else "right")
    for label, suffix in [(c, f"/{c}") for c in categories] + [("overall", "")]:
        row = [label, f"{summary.get('num_samples' + suffix, 0):.0f}",
               f"{summary.get('throughput_tok_s' + suffix, 0):.2f}", f"{summary.get('mean_sample_tok_s' + suffix, 0):.2f}",
               f"{1000 * summary.get('ttft_s' + suffix, 0):.1f}", f"{1000 * summary.get('tpot_s' + suffix, 0):.1f}",
               f"{summary.get('new_tokens' + suffix, 0):.0f}"]
        row += [_fmt(summary.get(key + suffix)) for key, _ in spec]
        row += [_fmt(summary.get(q + suffix)) for q in quality]
        table.add_row(*row, style="bold" if label == "overall" else None)
    return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_summary(summary: Dict[str, float], run_dir: Path, tracking: TrackingConfig, remote_failures: List[str]) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(summary_table(summary))
    console.print(f"Run folder: {run_dir}")
    if tracking.mlflow is not None and not any(f.startswith("mlflow") for f in remote_failures):
        uri = tracking.mlflow.tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            console.print(f"Open the results: mlflow ui --backend-store-uri {uri}")
        else:
            console.print(f"Results logged to MLflow at {uri}")
    if tracking.wandb is not None and not any(f.startswith("wandb") for f in remote_failures):
        console.print("W&B: offline runs upload with `wandb sync <run_dir>/wandb/offline-run-*`")

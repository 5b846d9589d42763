"""``decodelab report SWEEP``: tables and plots of a sweep folder or an MLflow parent run (decodelab/analysis/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List

from decodelab.analysis.report import REPORT_FOLDER, write_report
from decodelab.cli.args import Command, parse
from decodelab.config import DEFAULT_TRACKING_URI

USAGE = ("usage: decodelab report SWEEP [--out DIR] [--tracking-uri URI | tracking.mlflow.tracking_uri=URI] "
         "(SWEEP: a sweep folder or an MLflow parent run id)")
COMMAND = Command("report", "SWEEP", {"--out": "DIR", "--tracking-uri": "URI"},
                  aliases={"tracking.mlflow.tracking_uri": "--tracking-uri"}, usage=USAGE)


def cli(args: List[str]) -> None:
    parsed = parse(COMMAND, args)
    if parsed is None:
        return
    out = parsed.value("--out")
    result = write_report(parsed.source, Path(out) if out else None, parsed.value("--tracking-uri", DEFAULT_TRACKING_URI))
    for path in [result["markdown"], result["html"], *result["plots"]]:
        print(f"wrote {path}")
    if result["pareto_metrics"]:
        print("Pareto quality metric per category: "
              + ", ".join(f"{category}={metric}" for category, metric in result["pareto_metrics"].items()))
    for title, reason in result["skipped"].items():
        print(f"skipped plot {title!r}: {reason}")
    if result["mlflow_run_id"]:
        print(f"logged the report to MLflow run {result['mlflow_run_id']} (artifacts {REPORT_FOLDER}/)")

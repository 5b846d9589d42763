"""``decodelab reproduce RUN [overrides]``: re-run a run folder or MLflow run and compare (decodelab/analysis/reproduce.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

from decodelab.analysis.reproduce import RESULT_FILE, reproduce
from decodelab.cli.args import Command, parse
from decodelab.config import DEFAULT_TRACKING_URI

USAGE = ("usage: decodelab reproduce RUN [--out DIR] [--tracking-uri URI] [overrides]\n"
         f"  RUN: a run folder or an MLflow run id (found in --tracking-uri, default {DEFAULT_TRACKING_URI})\n"
         "  overrides: key=value on top of the logged config, e.g. tracking=none task.limit=2")
COMMAND = Command("reproduce", "RUN", {"--out": "DIR", "--tracking-uri": "URI"}, overrides=True, usage=USAGE)


def parse_args(args: List[str]) -> Optional[Tuple[str, Optional[str], str, List[str]]]:
    """RUN, --out, --tracking-uri and the overrides; None after printing the usage for -h/--help."""
    parsed = parse(COMMAND, args)
    if parsed is None:
        return None
    return parsed.source, parsed.value("--out"), parsed.value("--tracking-uri", DEFAULT_TRACKING_URI), parsed.overrides


def cli(args: List[str]) -> None:
    parsed = parse_args(args)
    if parsed is None:
        return
    source, out_dir, tracking_uri, overrides = parsed
    console = _console()
    result = reproduce(source, out_dir, overrides, tracking_uri=tracking_uri, announce=console.print)
    print_result(result, console)
    if not result["ok"]:
        sys.exit(1)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def print_result(result: dict, console: Any) -> None:
    from rich.table import Table

    outputs = result["outputs"]
    kind = "greedy" if result["greedy"] else "sampling, seeded"
    console.print(f"outputs identical: {outputs['identical']}/{outputs['compared']} samples ({kind})")
    for diff in outputs["differing"]:
        console.print(f"  differs: {diff['id']} turn {diff['turn']}, first differing token index {diff['index']}")
    if outputs["only_original"]:
        console.print(f"  not reproduced (not in the new run): {len(outputs['only_original'])} samples")
    title = "original vs reproduced" + (" (original over the same samples)"
                                        if result["original_metrics_over"] == "subset" else "")
    table = Table(title=title)
    for column in ("metric", "original", "reproduced", "change", "note"):
        table.add_column(column, justify="left" if column in ("metric", "note") else "right")
    for row in result["metrics"]:
        old, new = row["original"], row["reproduced"]
        original_text, reproduced_text, note = _fmt(old), _fmt(new), ""
        if row["key"] == "speedup":
            original_text += _fmt_ci(row.get("original_ci"))
            reproduced_text += _fmt_ci(row.get("reproduced_ci"))
            within = row.get("within_original_ci")
            note = "" if within is None else ("within original CI" if within else "[bold red]OUTSIDE original CI[/]")
        table.add_row(row["label"], original_text, reproduced_text, _change(old, new), note)
    console.print(table)
    changes = result["environment_changes"]
    if not changes:
        console.print("environment unchanged")
    else:
        console.print(f"environment changed ({len(changes)} keys):")
        for key, (old, new) in changes.items():
            console.print(f"  {key}: {old!r} -> {new!r}", markup=False)
    for note in result["notes"]:
        console.print(f"note: {note}")
    console.print(f"Comparison: {Path(result['reproduced_run_dir']) / RESULT_FILE}")
    if result["greedy"] and outputs["differing"]:
        console.print(f"[bold red]greedy outputs differ in {len(outputs['differing'])} of "
                      f"{outputs['compared']} samples[/]")


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def _fmt_ci(ci: Optional[List[Optional[float]]]) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{_fmt(ci[0])}..{_fmt(ci[1])}]"


def _change(old: Optional[float], new: Optional[float]) -> str:
    if old is None or new is None:
        return "-"
    if old == 0:
        return f"{new - old:+.3f}"
    return f"{100 * (new - old) / abs(old):+.1f}%"

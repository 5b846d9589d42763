"""``decodelab reproduce RUN [overrides]``: re-run a run folder or MLflow run and compare (decodelab/analysis/reproduce.py)."""

from __future__ import annotations

import sys
from typing import List, Optional, Tuple

from decodelab.analysis.reproduce import reproduce
from decodelab.cli.args import Command, parse
from decodelab.config import DEFAULT_TRACKING_URI

USAGE = ("usage: decodelab reproduce RUN [--out DIR] [--tracking-uri URI] [overrides]\n"
         f"  RUN: a run folder or an MLflow run id (found in --tracking-uri, default {DEFAULT_TRACKING_URI})\n"
         "  overrides: key=value on top of the logged config, e.g. logger=none task.limit=2")
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
    result = reproduce(source, out_dir, overrides, tracking_uri=tracking_uri)
    if not result["ok"]:
        sys.exit(1)

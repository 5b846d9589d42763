"""``decodelab simulate RUN_DIR``: offline acceptance of model-free drafters over a grid (decodelab/analysis/simulate.py)."""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from decodelab.analysis.simulate import (RecordedRun, exact_replays, load_run, model_free, parse_grid,
                                         recorded_summary, search, yaml_value)
from decodelab.cli.args import Command, parse
from decodelab.errors import UserError



def usage() -> str:
    return ("usage: decodelab simulate RUN_DIR [--drafter NAME[,NAME]]... [--grid KEY=v1,v2,...]... [--top N] "
            "[--out PATH]\n"
            f"  --drafter: model-free drafters to simulate: {', '.join(model_free())} "
            f"(default: {', '.join(exact_replays())})\n"
            "  --grid: values of one drafter setting (replaces its default grid); repeatable\n"
            "  --top: print only the best N rows (simulate.json has all); --out: a folder or a .json path (default RUN_DIR)")


COMMAND = Command("simulate", "RUN_DIR", {"--drafter": "NAME", "--grid": "KEY=v1,v2", "--top": "N", "--out": "PATH"},
                  repeatable=("--drafter", "--grid"), usage=usage)


def cli(args: List[str]) -> None:
    parsed = parse(COMMAND, args)
    if parsed is None:
        return
    names = [n.strip() for item in parsed.values["--drafter"] for n in str(item).split(",") if n.strip()]  # type: ignore[union-attr]
    for name in names:
        if name not in model_free():
            raise UserError(f"--drafter {name}: not a model-free drafter; allowed: {', '.join(model_free())}")
    drafters = list(dict.fromkeys(names or exact_replays()))
    top = _top(parsed.value("--top"))
    run = load_run(parsed.source)
    result, best, out = search(run, drafters, parse_grid(parsed.values["--grid"]), parsed.value("--out"))  # type: ignore[arg-type]
    rows = result["rows"]
    print_result(run, rows[:top], best, result["confirm_command"], result["costs"], result["notes"])
    print(f"all {len(rows)} rows: {out}")


def _top(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        top = int(value)
    except ValueError:
        raise UserError(f"--top: must be an integer >= 1, got {value!r}") from None
    if top < 1:
        raise UserError(f"--top: must be >= 1, got {top}")
    return top


def print_result(run: RecordedRun, rows: List[Dict[str, Any]], best: List[Dict[str, Any]], confirm: str,
           costs: Optional[Dict[str, Any]], notes: List[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    turns = sum(len(r["output_tokens"]) for r in run.records)
    tokens = sum(len(o) for r in run.records for o in r["output_tokens"])
    table = Table(title=f"simulated acceptance: {len(run.records)} prompts, {turns} turns, {tokens} recorded tokens")
    columns = ["#", "drafter", "settings", "tau", "alpha", "draft len", "steps"]
    columns += ["pred. speedup"] if costs else []
    unresolved = any(r["unresolved_steps"] for r in rows)
    columns += ["unresolved"] if unresolved else []
    for column in columns:
        table.add_column(column, justify="left" if column in ("drafter", "settings") else "right")
    for rank, row in enumerate(rows, start=1):
        cells = [str(rank), row["drafter"] + ("" if row["exact"] else " ~"),
                 escape(" ".join(f"{k}={yaml_value(v)}" for k, v in row["settings"].items())),
                 f"{row['mean_accepted_length']:.3f}", f"{row['acceptance_rate']:.3f}",
                 f"{row['mean_draft_length']:.2f}", str(row["verify_steps"])]
        cells += [f"{row['predicted_speedup']:.2f}x" if "predicted_speedup" in row else "-"] if costs else []
        cells += [str(row["unresolved_steps"])] if unresolved else []
        table.add_row(*cells)
    console.print(table)
    recorded = recorded_summary(run)
    if "mean_accepted_length" in recorded:
        console.print(f"recorded run: drafter={recorded['drafter']} tau {recorded['mean_accepted_length']:.3f} "
                      f"alpha {recorded.get('acceptance_rate', 0.0):.3f}")
    if costs:
        console.print(f"pred. speedup = tau / (simulated draft time + verification {costs['verify_cost_per_step']:.2f} "
                      f"AR steps, {costs['verify_cost_source']}), AR step {1000 * costs['ar_step_s']:.2f} ms")
    if any(not r["exact"] for r in rows):
        console.print("~ approximate: token_recycling learns from logits the run did not record (see decodelab/analysis/simulate.py)")
    if unresolved:
        console.print("unresolved: steps whose draft matched a recorded output to its end and went on; "
                      "counted as rejected past it")
    for note in notes:
        console.print(escape(note))
    for index, row in enumerate(best):
        console.print(("best: " if index == 0 else "      ") + escape(row["overrides"])
                      + f"   (tau {row['mean_accepted_length']:.3f}, alpha {row['acceptance_rate']:.3f})")
    console.print("confirm: " + escape(confirm), soft_wrap=True)

"""Predicted vs measured speedup per drafter run: the recorded acceptance priced with a latency curve measured apart.

The measured speedup is the run's own (``baseline=fresh``: AR decoded beside every prompt, a bootstrap 95%
interval over prompts). Two predictions sit beside it, per category and overall:
- ``curve``: the tokens every recorded step yielded (the empirical accepted-length distribution) over its cost,
  the recorded draft time plus the forward of its drafted tokens and the root, read off the latency curve that
  ``verify_latency.py`` measured in another process (decodelab.experiment.telemetry.curve_predicted_speedup);
- ``iid``: Leviathan et al.'s E[tokens per step] from alpha and the mean draft depth, priced the same way.

    .venv/bin/python benchmarks/verify_latency.py --out /tmp/curve.json
    decodelab run drafter=suffix baseline=fresh task.max_new_tokens=64 tracking=none hydra.run.dir=/tmp/suffix
    .venv/bin/python benchmarks/predict_speedup.py --curve /tmp/curve.json /tmp/suffix [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from decodelab.experiment.stats import bootstrap_speedup
from decodelab.experiment.telemetry import (acceptance_stats, curve_cost, curve_predicted_speedup,
                                            expected_tokens_per_step, merge_steps)
from decodelab.tracking.run_folder import RunFolder


def predict(samples: List[dict], curve: Dict[int, float], forward_s: float) -> Dict[str, float]:
    """Measured speedup [CI] and both predictions over ``samples`` (records with a fresh baseline)."""
    pairs = [(s["new_tokens"], s["wall_s"], s["baseline"]["new_tokens"], s["baseline"]["wall_s"])
             for s in samples if s.get("baseline")]
    steps = merge_steps(samples)
    stats = acceptance_stats(steps)
    out: Dict[str, float] = dict(bootstrap_speedup(pairs))
    out["prompts"] = len(pairs)
    out["tau"] = float(stats["mean_accepted_length"])  # type: ignore[arg-type]
    out["curve"] = curve_predicted_speedup(steps, curve, forward_s) or 0.0
    if "acceptance_rate" in stats and steps:
        per_step = (sum(s.draft_s for s in steps) / forward_s
                    + sum(curve_cost(curve, s.drafted + 1) for s in steps)) / len(steps)
        depth = float(stats["mean_draft_depth"])  # type: ignore[arg-type]
        out["iid"] = expected_tokens_per_step(float(stats["acceptance_rate"]), depth) / per_step  # type: ignore[arg-type]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders of drafter runs decoded with baseline=fresh")
    parser.add_argument("--curve", required=True, help="verify_latency.py's JSON (cost_ratio and median_s)")
    parser.add_argument("--out", default="benchmarks/results/predict_speedup.json")
    args = parser.parse_args()

    measured = json.loads(Path(args.curve).read_text())
    curve = {int(n): float(c) for n, c in measured["cost_ratio"].items()}
    forward_s = float(measured["median_s"]["1"])
    print(f"curve: one-token forward {1000 * forward_s:.1f} ms; "
          + ", ".join(f"{n}: {c:.2f}x" for n, c in sorted(curve.items()) if n in (2, 4, 8, 16)))
    results = {"curve": args.curve, "fingerprint": measured.get("fingerprint"), "runs": {}}
    for run_dir in args.runs:
        folder = RunFolder(run_dir)
        drafter = (folder.config().get("drafter") or {}).get("name")
        samples = folder.samples(strict=True)
        by_category: Dict[str, List[dict]] = defaultdict(list)
        for sample in samples:
            by_category[sample.get("category") or "all"].append(sample)
        rows = {"overall": predict(samples, curve, forward_s)}
        rows.update({name: predict(group, curve, forward_s) for name, group in sorted(by_category.items())})
        results["runs"][run_dir] = {"drafter": drafter, "rows": rows}
        print(f"\n{drafter} ({run_dir})")
        print(f"  {'category':<15} {'n':>3} {'tau':>5} {'measured [95% CI]':>22} {'curve':>7} {'err':>7} "
              f"{'iid':>7} {'err':>7}")
        for name, row in rows.items():
            if "speedup" not in row:
                continue
            errors = [f"{row[k]:7.3f} {100 * (row[k] / row['speedup'] - 1):+6.1f}%" if k in row else f"{'-':>7} {'':>7}"
                      for k in ("curve", "iid")]
            print(f"  {name:<15} {row['prompts']:>3} {row['tau']:5.2f} {row['speedup']:7.3f} "
                  f"[{row['speedup_ci_low']:.2f}, {row['speedup_ci_high']:.2f}]     " + " ".join(errors))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()

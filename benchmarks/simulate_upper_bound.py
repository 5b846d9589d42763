"""How fast could the model-free drafters make SmolLM2 on this CPU, per category, at their best settings?

Replays a greedy AR run's outputs (``decodelab simulate``'s engine replay: exact for prompt_lookup and
suffix, approximate for token_recycling) over each drafter's default grid, and predicts each setting's
speedup per category from the measured verification latency curve (benchmarks/results/verify_latency.json):

    predicted speedup = tau / (verify_cost(1 + mean drafted tokens per step) + draft_cost)

with verify_cost the curve's latency ratio (linear between measured points) and draft_cost the
simulated drafter's own time per step in AR-step units (``--free-drafts`` sets it to 0 for an upper
bound). This bounds what tuning these drafters can reach here, without running the target per setting.

    .venv/bin/decodelab run model=smollm2-135m task.max_new_tokens=64 tracking=none baseline=none hydra.run.dir=/tmp/ar_full
    .venv/bin/python benchmarks/simulate_upper_bound.py /tmp/ar_full
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decodelab.analysis.simulate import grid_points, load_run, simulate  # noqa: E402


def latency_curve(path: Path):
    ratios = {int(k): float(v) for k, v in json.loads(path.read_text())["cost_ratio"].items()}
    points = sorted(ratios.items())

    def cost(tokens: float) -> float:
        if tokens <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if tokens <= x1:
                return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        return points[-1][1]

    return cost, json.loads(path.read_text())["median_s"]["1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--drafters", nargs="*", default=["prompt_lookup", "suffix", "token_recycling"])
    parser.add_argument("--curve", default=str(ROOT / "benchmarks" / "results" / "verify_latency.json"))
    parser.add_argument("--free-drafts", action="store_true", help="count drafting as free (upper bound)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "simulate_upper_bound.json"))
    args = parser.parse_args()

    cost, ar_step_s = latency_curve(Path(args.curve))
    run = load_run(args.run_dir)
    points, _ = grid_points(args.drafters, {}, run)
    best: Dict[str, Dict] = {}
    for cfg, settings in points:
        result = simulate(run.records, cfg, run.max_new_tokens)
        steps_by_category: Dict[str, List[List[float]]] = defaultdict(list)
        for sample in result["samples"]:
            steps_by_category[str(sample["category"])] += sample["steps"]
            steps_by_category["overall"] += sample["steps"]
        for category, steps in steps_by_category.items():
            n = len(steps)
            tau = sum(s[1] + s[2] for s in steps) / n
            drafted = sum(s[0] for s in steps) / n
            draft_cost = 0.0 if args.free_drafts else sum(s[3] for s in steps) / n / ar_step_s
            predicted = tau / (cost(1 + drafted) + draft_cost)
            row = {"drafter": cfg.name, "settings": settings, "tau": round(tau, 3),
                   "drafted_per_step": round(drafted, 2), "verify_cost": round(cost(1 + drafted), 3),
                   "draft_cost": round(draft_cost, 3), "predicted_speedup": round(predicted, 3),
                   "exact": result["exact"]}
            key = f"{category}|{cfg.name}"
            if key not in best or row["predicted_speedup"] > best[key]["predicted_speedup"]:
                best[key] = row
    categories = sorted({k.split("|")[0] for k in best}, key=lambda c: (c != "overall", c))
    print(f"{'category':<16} {'drafter':<16} {'tau':>6} {'k/step':>7} {'verify':>7} {'draft':>6} {'pred.':>6}  settings")
    for category in categories:
        for name in args.drafters:
            row = best.get(f"{category}|{name}")
            if row:
                print(f"{category:<16} {name + ('' if row['exact'] else '~'):<16} {row['tau']:>6.2f} "
                      f"{row['drafted_per_step']:>7.2f} {row['verify_cost']:>7.2f} {row['draft_cost']:>6.2f} "
                      f"{row['predicted_speedup']:>5.2f}x  {row['settings']}")
    Path(args.out).write_text(json.dumps({"run_dir": args.run_dir, "free_drafts": args.free_drafts,
                                          "best": best}, indent=2) + "\n")
    print(f"written {args.out} (~: token_recycling replay is approximate)")


if __name__ == "__main__":
    main()

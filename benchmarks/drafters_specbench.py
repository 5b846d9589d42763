"""Every drafter on SmolLM2 fp32 greedy, specbench-mini: speedup, tau and alpha per category.

Each drafter is one decodelab run with baseline=fresh: for every prompt the AR baseline is decoded
right before the drafter (alternating, same process, same input ids), so the speedup is a ratio of
throughputs measured side by side, with a bootstrap 95% interval over prompts. Losslessness is checked
token by token on every prompt.

    .venv/bin/python benchmarks/drafters_specbench.py [--drafters prompt_lookup suffix ...] [--per-category 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from decodelab.experiment.compose import compose
from decodelab.drafters.registry import REGISTRY
from decodelab.experiment.metrics import summarize
from decodelab.experiment.runner import run

CATEGORIES = ["conversation", "translation", "summarization", "qa", "math_reasoning", "rag"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafters", nargs="*", default=[d for d in REGISTRY if d != "none"])
    parser.add_argument("--per-category", type=int, default=3, help="prompts per category (specbench-mini has 5)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--out", default="benchmarks/results/drafters_specbench.json")
    args = parser.parse_args()

    results = {}
    for drafter in args.drafters:
        samples = []
        for category in CATEGORIES:  # per category so --per-category takes the first N of each
            overrides = [f"model={args.model}", f"drafter={drafter}", "strategy=greedy", "tracking=none",
                         "baseline=fresh", "progress=false", "print_table=false", f"task.categories=[{category}]",
                         f"task.limit={args.per_category}", f"task.max_new_tokens={args.max_new_tokens}", *args.extra]
            out_dir = Path("runs") / "bench_drafters" / drafter / category
            run(compose(overrides), output_dir=str(out_dir))
            samples += [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
        results[drafter] = summarize(samples)
        _print_drafter(drafter, results[drafter])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


def _print_drafter(drafter: str, summary: dict) -> None:
    print(f"\n== drafter={drafter}")
    print(f"  {'category':15s} {'speedup':>8s} {'95% CI':>15s} {'tau':>6s} {'alpha':>6s} {'lossless':>8s} "
          f"{'tok/s':>7s} {'AR tok/s':>8s}")
    for label, suffix in [(c, f"/{c}") for c in CATEGORIES] + [("overall", "")]:
        get = lambda key: summary.get(key + suffix, float("nan"))  # noqa: E731
        print(f"  {label:15s} {get('speedup'):8.2f} [{get('speedup_ci_low'):5.2f}, {get('speedup_ci_high'):5.2f}] "
              f"{get('mean_accepted_length'):6.2f} {get('acceptance_rate'):6.2f} {get('lossless_rate'):8.2f} "
              f"{get('throughput_tok_s'):7.2f} {get('baseline_throughput_tok_s'):8.2f}")


if __name__ == "__main__":
    main()

"""Every decoding strategy on SmolLM2 over specbench-mini (or another task): quality per category against
throughput and forwards per token, with the Pareto front.

One process, one loaded model; every strategy has its own runner (its own caches) and they take turns prompt by
prompt, the order rotating each prompt, so drift in machine load spreads over all of them. Each strategy's
records are summarised as a run would summarise them (decodelab.experiment.metrics.summarize); the quality
metric per category is the Pareto report's choice (decodelab.analysis.pareto). The memory bandwidth is measured
in the same run, beside the fingerprint, so throughputs can be set against the machine's limit.

    .venv/bin/python benchmarks/strategies_specbench.py [--max-new-tokens 48] [--limit N]
    .venv/bin/python benchmarks/strategies_specbench.py --task mtbench --limit 20 --max-turns 1 --out ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from decodelab.analysis import pareto
from decodelab.experiment.compose import compose, to_run_config
from decodelab.experiment.fingerprint import environment_fingerprint
from decodelab.experiment.metrics import summarize
from decodelab.experiment.runner import PromptRunner, setup_backend
from decodelab.models.loading import load_model
from decodelab.tasks import load_task

STRATEGIES = ["greedy", "sample", "top_p", "min_p", "beam", "diverse_beam", "dola", "cad_plain",
              "contrastive_search", "mbr"]


def bandwidth_gb_s(size_mb: int = 1024, repeats: int = 5) -> float:
    """A torch sum over ``size_mb`` of float32: the read bandwidth this process gets (best of ``repeats``)."""
    data = torch.ones(size_mb * 2**20 // 4)
    best = min(_timed(lambda: data.sum()) for _ in range(repeats))
    return data.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="specbench-mini")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-turns", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/strategies_specbench.json")
    args = parser.parse_args()

    task = [f"task={args.task}", f"task.max_new_tokens={args.max_new_tokens}"]
    task += [f"task.limit={args.limit}"] if args.limit else []
    task += [f"task.max_turns={args.max_turns}"] if args.max_turns else []
    runs = {name: to_run_config(compose([f"model={args.model}", f"strategy={name}", *task, "tracking=none",
                                         "output_dir=unused"])) for name in args.strategies}
    first = next(iter(runs.values()))
    setup_backend(first.backend)
    loaded = load_model(first.model, first.backend)
    runners = {name: PromptRunner(loaded, run) for name, run in runs.items()}
    prompts = load_task(first.task)
    bandwidth = bandwidth_gb_s()
    records = {name: [] for name in runners}
    order = list(runners)
    for index, prompt in enumerate(prompts):
        turn = order[index % len(order):] + order[:index % len(order)]
        for name in turn:
            records[name].append(runners[name].run_prompt(index, prompt))
        print(f"prompt {index + 1}/{len(prompts)} ({prompt.category}) done", flush=True)
    summaries = {name: summarize(rows) for name, rows in records.items()}
    categories = sorted({p.category for p in prompts})
    metrics = {c: m for c in categories if (m := pareto.choose_metric(summaries.values(), c))}
    rows = [row for name, summary in summaries.items() for row in pareto.summary_rows(name, name, "none", summary, metrics)]
    fronts = pareto.pareto_fronts(rows)
    on_front = {(r.strategy, r.category) for front in fronts.values() for r in front}
    print(f"\nmodel={args.model} task={args.task} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
          f"threads={torch.get_num_threads()} bandwidth={bandwidth:.1f} GB/s")
    for category in categories:
        print(f"\n{category} (quality: {metrics.get(category, '-')})")
        print(f"  {'strategy':<19} {'quality':>8} {'distinct_2':>10} {'repetition':>10} {'tok/s':>7} {'fwd/tok':>8} front")
        for name, summary in summaries.items():
            get = lambda key: summary.get(f"{key}/{category}")  # noqa: E731
            quality = get(metrics[category]) if category in metrics else None
            fwd = (get("target_forwards_per_token") or 0) + (get("aux_forwards_per_token") or 0)
            print(f"  {name:<19} {_fmt(quality):>8} {_fmt(get('distinct_2')):>10} {_fmt(get('repetition_rate')):>10} "
                  f"{_fmt(get('throughput_tok_s'), 2):>7} {fwd:8.2f} {'*' if (name, category) in on_front else ''}")
    plot = pareto.pareto_plot(rows, Path(args.out).with_suffix(".png"))
    result = {"args": vars(args), "bandwidth_gb_s": bandwidth, "metrics": metrics, "summaries": summaries,
              "fronts": {c: [r.strategy for r in front] for c, front in fronts.items()}, "plot": str(plot),
              "fingerprint": environment_fingerprint(seeds={}, threads=torch.get_num_threads())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()

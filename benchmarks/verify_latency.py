"""How target forward latency grows with the number of tokens verified at once (1..64) on this machine.

Verification is not free on a CPU: a forward over k+1 tokens costs more than one over 1 token, and
the predicted speedup must use this curve rather than Leviathan et al.'s "verification costs one
step". For each n, a forward of n new tokens after a fixed cached context is timed (median of
repeats, order shuffled), and the ratio to n=1 is printed and saved with the environment fingerprint.

    .venv/bin/python benchmarks/verify_latency.py [--model smollm2-135m] [--context 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.experiment.compose import compose
from decodelab.experiment.compose import to_run_config
from decodelab.experiment.fingerprint import environment_fingerprint
from decodelab.models.loading import load_model
from decodelab.experiment.runner import setup_backend

SIZES = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/verify_latency.json")
    args = parser.parse_args()

    run = to_run_config(compose([f"model={args.model}", "tracking=none", "output_dir=unused"]))
    setup_backend(run.backend)
    loaded = load_model(run.model, run.backend)
    adapter = LMAdapter(loaded.model)
    vocab = loaded.model.config.vocab_size
    rng = random.Random(0)
    context = [rng.randrange(100, vocab) for _ in range(args.context)]
    adapter.prefill(context)
    times = {n: [] for n in SIZES}
    for _ in range(args.repeats):
        for n in rng.sample(SIZES, len(SIZES)):
            tokens = [rng.randrange(100, vocab) for _ in range(n)]
            start = time.perf_counter()
            adapter.forward(tokens)
            times[n].append(time.perf_counter() - start)
            adapter.crop(len(context))
    base = statistics.median(times[1])
    curve = {n: statistics.median(t) / base for n, t in times.items()}
    print(f"model={args.model} context={args.context} threads={torch.get_num_threads()} "
          f"one-token forward={1000 * base:.1f} ms")
    print("  tokens  median ms  cost vs 1 token")
    for n in SIZES:
        print(f"  {n:6d}  {1000 * statistics.median(times[n]):9.1f}  {curve[n]:6.2f}x")
    result = {"args": vars(args), "median_s": {n: statistics.median(t) for n, t in times.items()},
              "cost_ratio": curve,
              "fingerprint": environment_fingerprint(seeds={}, threads=torch.get_num_threads())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

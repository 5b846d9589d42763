"""The target forward against the memory-bandwidth limit, per KV cache / forward path, side by side.

A decode step must read every weight once, so bytes of weights over the memory bandwidth (measured here, in
the same run: a torch sum over 1 GiB) is the floor of a one-token forward. For each path (transformers'
DynamicCache forward; decodelab's static-cache forward, eager over F.linear, eager over oneDNN-packed weights,
and compiled) and each token count n (1 = a decode step, n > 1 = a verification of n - 1 drafted tokens), a
forward of n new tokens after ``--context`` cached tokens is timed; paths and sizes alternate within every
repeat, and every path's logits are compared with the first path's. The compiled path's compile time (its warm-up) is reported apart.

    .venv/bin/python benchmarks/forward_roofline.py [--model smollm2-135m] [--context 256] [--repeats 9]
        [--paths dynamic,static,onednn,compiled] [--sizes 1,2,4,8,16] [overrides...]

Overrides are decodelab config overrides, e.g. a random-weight 1B llama on a GPU (benchmarks/gpu_check.sh):
    ... model=tiny-random model.hidden_size=2048 model.num_layers=16 backend=cuda
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from decodelab.decoding.lm import LMAdapter, synchronize
from decodelab.experiment.compose import compose, to_run_config
from decodelab.experiment.fingerprint import environment_fingerprint
from decodelab.experiment.runner import setup_backend
from decodelab.models.loading import load_model

SIZES = [1, 2, 4, 8, 16]
# Paths: dynamic (transformers' forward), static (decodelab's, the modules' F.linear), onednn (decodelab's over
# oneDNN-packed weights, backend.linear=onednn), gemv (decodelab's over kernels/linear.cpp, backend.linear=gemv),
# compiled (decodelab's under inductor, which packs weights itself). A path named as a backend.linear kind runs it.
LINEARS = ("onednn", "gemv")


def bandwidth_gb_s(device: torch.device, gib: float = 1.0, repeats: int = 7) -> float:
    """Read bandwidth of ``device``: the best of ``repeats`` torch sums over ``gib`` GiB of float32."""
    data = torch.ones(int(gib * 2**30) // 4, device=device)
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        data.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def weight_bytes(model) -> int:
    """Bytes of the distinct parameters (a tied embedding / LM head counted once): what one step reads."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--paths", default="dynamic,static,onednn,compiled")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--out", default="benchmarks/results/forward_roofline.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    run = to_run_config(compose([f"model={args.model}", f"backend.dtype={args.dtype}", "tracking=none",
                                 "output_dir=unused", *args.overrides]))
    setup_backend(run.backend)
    loaded = load_model(run.model, run.backend)
    fingerprint = environment_fingerprint(seeds={}, threads=torch.get_num_threads())
    print("fingerprint:", json.dumps({k: fingerprint.get(k) for k in ("cpu_model", "cpu_isa", "torch_cpu_capability", "torch_num_threads")}))
    paths = args.paths.split(",")
    sizes = [int(n) for n in args.sizes.split(",")]
    adapters = {name: LMAdapter(loaded.model, cache="dynamic" if name == "dynamic" else "static",
                                compile=name == "compiled", linear=name if name in LINEARS else "torch") for name in paths}
    for adapter in adapters.values():
        adapter.reserve(args.context + max(sizes) + 1)
    compile_s = {name: adapter.warmup(sizes) for name, adapter in adapters.items()}
    vocab = loaded.model.config.vocab_size
    rng = random.Random(0)
    context = [rng.randrange(100, vocab) for _ in range(args.context)]
    for adapter in adapters.values():
        adapter.prefill(context)
    device = next(loaded.model.parameters()).device
    gb_s = bandwidth_gb_s(device)
    floor_s = weight_bytes(loaded.model) / (gb_s * 1e9)
    times = {(p, n): [] for p in paths for n in sizes}
    worst = {p: 0.0 for p in paths}
    for _ in range(args.repeats):
        for n in rng.sample(sizes, len(sizes)):
            tokens = [rng.randrange(100, vocab) for _ in range(n)]
            logits = {}
            for name in rng.sample(paths, len(paths)):
                adapter = adapters[name]
                synchronize(device)
                start = time.perf_counter()
                logits[name] = adapter.forward(tokens)
                synchronize(device)
                times[(name, n)].append(time.perf_counter() - start)
                adapter.crop(len(context))
            for name in paths:  # every path against the first one named
                worst[name] = max(worst[name], (logits[name] - logits[paths[0]]).abs().max().item())
    gb_s_after = bandwidth_gb_s(device)
    print(f"model={args.model} dtype={args.dtype} device={device} context={args.context} "
          f"threads={torch.get_num_threads()} overrides={args.overrides}")
    print(f"weights {weight_bytes(loaded.model) / 1e6:.0f} MB; bandwidth {gb_s:.1f} GB/s (after: {gb_s_after:.1f}); "
          f"floor of a 1-token forward {1000 * floor_s:.1f} ms")
    print("  path      n  median ms  vs 1 token  fraction of limit  max |logit diff|")
    result = {"args": vars(args), "bandwidth_gb_s": [gb_s, gb_s_after], "floor_s": floor_s, "compile_s": compile_s,
              "paths": {}}
    print("compile (warm-up) s:", {k: round(v, 1) for k, v in compile_s.items()})
    for name in paths:
        one = statistics.median(times[(name, 1)])
        result["paths"][name] = {"median_s": {}, "vs_one": {}, "fraction_of_limit": floor_s / one,
                                 "max_abs_logit_diff": worst[name]}
        for n in sizes:
            median = statistics.median(times[(name, n)])
            result["paths"][name]["median_s"][n] = median
            result["paths"][name]["vs_one"][n] = median / one
            print(f"  {name:8s} {n:2d}  {1000 * median:9.1f}  {median / one:9.2f}x  "
                  f"{floor_s / median if n == 1 else float('nan'):17.2f}  {worst[name]:.2e}")
    first = statistics.median(times[(paths[0], 1)])
    for name in paths[1:]:
        print(f"{name} vs {paths[0]}, 1-token forward: {first / statistics.median(times[(name, 1)]):.2f}x")
    result["fingerprint"] = fingerprint
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

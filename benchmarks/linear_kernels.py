"""One matmul of a decode step, per weight matrix and row count: MKL's F.linear, oneDNN-packed weights and
decodelab's gemv kernel, side by side, against a torch sum over the same bytes.

The shapes are a model's own (default SmolLM2-135M: q/k/v and gate/up stacked as the static forward groups them,
o, down, the LM head). Each contestant reads a different copy of the matrix on every call, and copies are
cycled so that no call finds its matrix in cache (a decode step reads every weight once: 538 MB for SmolLM2,
more than any cache). Contestants alternate call by call; medians; the bandwidth of the same run is printed.

    .venv/bin/python benchmarks/linear_kernels.py [--model smollm2-135m] [--rows 1,2,4,8] [--repeats 60]
        [--copies-mb 800] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from decodelab.experiment.compose import compose, to_run_config
from decodelab.experiment.fingerprint import environment_fingerprint
from decodelab.experiment.runner import setup_backend
from decodelab.kernels import linear as kernel
from decodelab.models.loading import load_model

from forward_roofline import bandwidth_gb_s



def shapes(model) -> Dict[str, tuple]:
    """(out_features, in_features) of each matmul of a layer, as the static forward groups them, and the head."""
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    return {
        "qkv": (sum(m.out_features for m in (attention.q_proj, attention.k_proj, attention.v_proj)),
                attention.q_proj.in_features),
        "o": (attention.o_proj.out_features, attention.o_proj.in_features),
        "gate_up": (mlp.gate_proj.out_features + mlp.up_proj.out_features, mlp.gate_proj.in_features),
        "down": (mlp.down_proj.out_features, mlp.down_proj.in_features),
        "head": tuple(model.lm_head.weight.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=60, help="calls per contestant and row count (at least)")
    parser.add_argument("--copies-mb", type=float, default=800,
                        help="copies of each matrix, in MB: enough that a copy leaves the cache before it comes round")
    parser.add_argument("--out", default="benchmarks/results/linear_kernels.json")
    parser.add_argument("overrides", nargs="*", help="decodelab config overrides (model=tiny-random ...)")
    args = parser.parse_args()
    run = to_run_config(compose([f"model={args.model}", "tracking=none", "output_dir=unused", *args.overrides]))
    setup_backend(run.backend)
    model = load_model(run.model, run.backend).model
    print("fingerprint:", json.dumps({k: environment_fingerprint(seeds={}, threads=torch.get_num_threads()).get(k)
                                      for k in ("cpu_model", "cpu_isa", "torch_cpu_capability", "torch_num_threads")}))
    print(f"kernel build/load: {kernel.load():.1f} s")
    bandwidth = bandwidth_gb_s(torch.device("cpu"))
    print(f"bandwidth: {bandwidth:.1f} GB/s (torch sum over 1 GiB)")
    result = {"args": vars(args), "bandwidth_gb_s": bandwidth, "matrices": {}}
    torch.manual_seed(0)
    for name, (n, k) in shapes(model).items():
        mb = n * k * 4 / 1e6
        copies = max(4, int(args.copies_mb * 1e6 / (n * k * 4)))
        weights = [torch.randn(n, k) for _ in range(copies)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights]
        result["matrices"][name] = {"shape": [n, k], "mb": mb, "rows": {}}
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(1, rows, k)
            contestants: Dict[str, Callable[[int], torch.Tensor]] = {
                "sum": lambda i: weights[i].sum(),
                "F.linear": lambda i: F.linear(x, weights[i]),
                "onednn": lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
            }
            contestants["gemv"] = lambda i: kernel.linear(x, [weights[i]])
            reference = F.linear(x.double(), weights[0].double())
            for label in contestants:
                if label != "sum":
                    error = ((contestants[label](0).double() - reference).abs().max() / reference.abs().max()).item()
                    assert error < 1e-5, (name, rows, label, error)
            times = {label: [] for label in contestants}
            rounds = max(1, -(-args.repeats // copies))
            # Contestant c reads copy (i + c * copies / C): each copy is last touched ~copies / C calls before.
            for _ in range(rounds):
                for i in range(copies):
                    for c, (label, call) in enumerate(contestants.items()):
                        j = (i + c * copies // len(contestants)) % copies
                        start = time.perf_counter()
                        call(j)
                        times[label].append(time.perf_counter() - start)
            medians = {label: statistics.median(t) for label, t in times.items()}
            result["matrices"][name]["rows"][rows] = {label: {"median_s": m, "gb_s": mb / m / 1e3}
                                                      for label, m in medians.items()}
            line = "  ".join(f"{label} {m * 1e6:.0f} us {mb / m / 1e3:.0f} GB/s" for label, m in medians.items())
            print(f"{name} [{n}x{k}, {mb:.1f} MB] rows={rows}: {line}  | gemv vs onednn "
                  f"{medians['onednn'] / medians['gemv']:.2f}x, of the sum's bandwidth {medians['sum'] / medians['gemv']:.2f}",
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

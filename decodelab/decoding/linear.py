"""How the static forward multiplies by a weight: the module's own ``F.linear``, or oneDNN-packed weights.

On CPU, ``F.linear`` goes to MKL's sgemm, whose small-M path streams SmolLM2's weights at 7-10 GB/s (a third of
the measured bandwidth) and costs 1.3-1.6x a decode step to verify 2-8 tokens. oneDNN's matmul over a weight
reordered once into its blocked layout (what inductor's weight freezing uses) reads the same stack at 15-18 GB/s,
with 1 to 8 rows costing about the same (benchmarks/forward_roofline.py, path ``onednn``); in bfloat16, where
``F.linear`` has no fast CPU kernel at all, it is the difference between 100 ms and a few ms per LM head.

``onednn`` keeps the model untouched: the packed copies live beside it (one per linear module, shared by every
adapter of the model, freed with it), so they cost a second copy of the linear weights in memory. Its sums run in
another order than MKL's (logits differ by ~1e-5 relative in float32), and, as with MKL, a row's result may
depend on how many rows share the call: greedy speculative decoding stays exact against an AR decode of the same
path up to such near-ties, which the runs' lossless check counts.
"""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch

from decodelab.errors import check

KEY = "backend.linear"
LINEARS = ("auto", "torch", "onednn")
# Batch hint of the oneDNN reorder (rows of the calls it is tuned for): 8 serves decode (1 row) and verification
# (2-16) best of 1 and 8 here (a 1-row hint makes 8 rows cost 1.4x one).
HINT = 8
# What oneDNN's CPU matmul packs here (float16 needs AVX-NE-CONVERT or AVX512-FP16, absent on most CPUs).
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)

# Per linear module: ((weight pointer, weight version), packed weight); an entry dies with its module.
_PACKED: "weakref.WeakKeyDictionary[torch.nn.Linear, Tuple[Tuple[int, int], torch.Tensor]]" = \
    weakref.WeakKeyDictionary()


def onednn_problem(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why oneDNN-packed weights cannot serve a model on ``device`` in ``dtype``, or None when they can."""
    if device.type != "cpu":
        return f"device {device.type} (oneDNN packing is a CPU path)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if dtype not in ONEDNN_DTYPES:
        return f"dtype {str(dtype).removeprefix('torch.')} (oneDNN packs float32 and bfloat16 here)"
    return None


def resolve(linear: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: oneDNN where it can serve, else torch; ``onednn`` where it cannot is a ConfigError."""
    check(linear in LINEARS, KEY, f"got {linear!r}, allowed: {', '.join(LINEARS)}")
    problem = onednn_problem(device, dtype)
    if linear == "auto":
        return "torch" if problem else "onednn"
    check(linear != "onednn" or problem is None, KEY, f"onednn cannot serve {problem}; use {KEY}=torch (or auto)")
    return linear


class Linears:
    """``y = x W^T + b`` for a model's linear modules, by the resolved ``kind`` (torch or onednn)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "torch" or type(module) is not torch.nn.Linear:  # a custom head computes itself
            return module(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed(module), module.bias, "none", [], "")

    def mlp(self, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The llama / qwen2 gated MLP (``down(act(gate(x)) * up(x))``, as transformers computes it)."""
        if self.kind == "torch":
            return mlp(x)
        return self(mlp.down_proj, mlp.act_fn(self(mlp.gate_proj, x)) * self(mlp.up_proj, x))


def packed(module: torch.nn.Linear) -> torch.Tensor:
    """The oneDNN-packed copy of ``module.weight``, made on first use (a module whose weight changed since, e.g.
    a trained head, is repacked)."""
    weight = module.weight
    entry = _PACKED.get(module)
    if entry is None or entry[0] != (weight.data_ptr(), weight._version):
        with torch.no_grad():
            entry = ((weight.data_ptr(), weight._version), torch.ops.mkldnn._reorder_linear_weight(weight.detach(), HINT))
        _PACKED[module] = entry
    return entry[1]

"""How the static forward multiplies by a weight: the module's own ``F.linear``, oneDNN-packed weights, or
decodelab's own few-row kernel (``gemv``).

On CPU, ``F.linear`` goes to MKL's sgemm, whose small-M path streams SmolLM2's weights at 7-10 GB/s (a third of
the measured bandwidth) and costs 1.3-1.6x a decode step to verify 2-8 tokens. oneDNN's matmul over a weight
reordered once into its blocked layout (what inductor's weight freezing uses) reads the same stack at 15-18 GB/s,
with 1 to 8 rows costing about the same (benchmarks/forward_roofline.py, path ``onednn``).

``onednn`` keeps the model untouched: the packed copies live beside it (one per group of linear modules, shared by
every adapter of the model, freed with it), so they cost a second copy of the linear weights in memory. Its sums run in
another order than MKL's (logits differ by ~1e-5 relative in float32), and, as with MKL, a row's result may
depend on how many rows share the call: greedy speculative decoding stays exact against an AR decode of the same
path up to such near-ties, which the runs' lossless check counts.

``gemv`` runs calls of up to ``GEMV_ROWS`` rows (decode steps, short drafts to verify) through
``kernels/linear.cpp`` (``decodelab.kernels.linear``, a layer below this one: it imports only torch): each weight row streamed once
for all rows, in the modules' own layout, at close to the bandwidth a sum reads, where oneDNN's matmul pays a fixed
cost per call; longer calls go to the oneDNN-packed weights, as ``onednn``. float32 on CPU, built with the machine's
C++ compiler on first use (cached). Within the kernel a row's sums never depend on the rows beside it.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import decodelab.kernels.linear as kernel
from decodelab.errors import ConfigError, check, notice

KEY = "backend.linear"
LINEARS = ("auto", "torch", "onednn", "gemv")
# Batch hint of the oneDNN reorder (rows of the calls it is tuned for): 8 serves decode (1 row) and verification
# (2-16) best of 1 and 8 here (a 1-row hint makes 8 rows cost 1.4x one).
HINT = 8
# What oneDNN's CPU matmul packs here (float16 needs AVX-NE-CONVERT or AVX512-FP16, absent on most CPUs).
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Rows up to which gemv's kernel runs a call; beyond, oneDNN's packed matmul is faster here: a SmolLM2 fp32 step
# of 1 / 2 / 3 rows took 33.6 / 38.8 / 47.4 ms over the kernel against 49.6 / 51.6 / 49.0 over oneDNN, 4 rows 51.3
# against 48.6 (benchmarks/forward_roofline.py --paths onednn,gemv).
GEMV_ROWS = 3

# Under a group's first linear module, per group (its members' ids): (the weights' pointers and versions, packed
# weight, stacked bias). The entries die with the module.
_PACKED: "weakref.WeakKeyDictionary[torch.nn.Linear, Dict[tuple, Tuple[tuple, torch.Tensor, Optional[torch.Tensor]]]]" \
    = weakref.WeakKeyDictionary()


def onednn_problem(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why oneDNN-packed weights cannot serve a model on ``device`` in ``dtype``, or None when they can."""
    if device.type != "cpu":
        return f"device {device.type} (oneDNN packing is a CPU path)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if dtype not in ONEDNN_DTYPES:
        return f"dtype {str(dtype).removeprefix('torch.')} (oneDNN packs float32 and bfloat16 here)"
    return None


def gemv_problem(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why decodelab's kernel cannot serve a model on ``device`` in ``dtype`` (or be built here), or None."""
    if device.type != "cpu":
        return f"device {device.type} (gemv is a CPU kernel)"
    if dtype != torch.float32:
        return f"dtype {str(dtype).removeprefix('torch.')} (gemv is float32)"
    return kernel.problem()


def resolve(linear: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: gemv where it can serve and its kernel builds, else oneDNN where it can serve, else torch (a failed
    build says so in one notice); ``onednn`` or ``gemv`` where it cannot serve is a ConfigError. gemv's library is
    built (first use on this machine) and loaded here, before any timed step."""
    check(linear in LINEARS, KEY, f"got {linear!r}, allowed: {', '.join(LINEARS)}")
    problem = onednn_problem(device, dtype)
    if linear == "auto":
        if problem:
            return "torch"
        if gemv_problem(device, dtype) is None:
            try:
                _load_gemv()
                return "gemv"
            except ConfigError as err:
                notice(f"{KEY}=auto takes onednn ({err})")
        return "onednn"
    check(linear != "onednn" or problem is None, KEY, f"onednn cannot serve {problem}; use {KEY}=torch (or auto)")
    if linear == "gemv":
        check(problem is None, KEY, f"gemv cannot serve {problem}; use {KEY}=auto (or torch)")
        problem = gemv_problem(device, dtype)
        check(problem is None, KEY, f"gemv cannot serve {problem}; use {KEY}=auto (or torch)")
        _load_gemv()
    return linear


_said_build = False


def _load_gemv() -> None:
    """Build or load the kernel's library; a failed build is one line naming the key (the compiler's output is
    in the build folder's log)."""
    global _said_build
    try:
        seconds = kernel.load()
    except (RuntimeError, OSError, ImportError) as err:
        check(False, KEY, f"gemv's kernel did not build in {kernel.build_dir()} ({str(err).splitlines()[0]}); "
                          f"use {KEY}=onednn (or torch)")
    if seconds > 2 and not _said_build:  # a build, not a load (load() is cached): said once per process
        _said_build = True
        notice(f"{KEY}=gemv: built its kernel in {seconds:.0f} s (first use on this machine; cached in "
               f"{kernel.build_dir()})")


class Linears:
    """``y = x W^T + b`` for a model's linear modules, by the resolved ``kind`` (torch, onednn or gemv)."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "gemv":
            _load_gemv()
            self._kernel = kernel.linear

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.group((module,), x)[0]

    def group(self, modules: Sequence[torch.nn.Module], x: torch.Tensor) -> List[torch.Tensor]:
        """Each module's output for the same input. oneDNN runs a group as one matmul over the weights stacked by
        rows (q/k/v, gate/up): a call costs ~30 us of fixed overhead here, 211 calls a SmolLM2 step otherwise."""
        if self._route(modules, x) == "torch":
            return [module(x) for module in modules]
        out = self.stacked(modules, x)
        return list(out.split([module.out_features for module in modules], dim=-1)) if len(modules) > 1 else [out]

    def stacked(self, modules: Sequence[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
        """The modules' outputs side by side in the last dimension (q/k/v as one tensor): one oneDNN matmul, or
        the modules' own outputs concatenated."""
        route = self._route(modules, x)
        if route == "torch":
            outputs = [module(x) for module in modules]
            return torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        if route == "kernel":
            return self._kernel(x, [m.weight for m in modules], () if modules[0].bias is None else
                                [m.bias for m in modules])
        weight, bias = packed(tuple(modules))
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    def residual(self, module: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + module(x)``. oneDNN in float32 adds inside the matmul (a post-op: the same sum, exactly,
        one op and one pass over the activations fewer); bfloat16 rounds the product first, as the model does."""
        route = self._route((module,), x)
        if route == "torch" or residual.dtype != torch.float32:
            return residual + self(module, x)
        if route == "kernel":
            return self._kernel(x, [module.weight], () if module.bias is None else [module.bias], residual)
        weight, bias = packed((module,))
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")

    def mlp(self, mlp: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual`` + the llama / qwen2 gated MLP (``down(act(gate(x)) * up(x))``, as transformers computes it)."""
        if self.kind == "torch":
            return residual + mlp(x)
        gate, up = self.group((mlp.gate_proj, mlp.up_proj), x)
        return self.residual(mlp.down_proj, mlp.act_fn(gate) * up, residual)

    def _route(self, modules: Sequence[torch.nn.Module], x: torch.Tensor) -> str:
        """Who runs this call: torch (the modules' own forward), kernel (gemv's, a few rows) or packed (oneDNN)."""
        if self.kind == "torch" or not _plain(modules):
            return "torch"
        return "kernel" if self.kind == "gemv" and x.numel() <= GEMV_ROWS * x.shape[-1] else "packed"


def _plain(modules: Sequence[torch.nn.Module]) -> bool:
    """Whether oneDNN can run ``modules`` as one matmul: plain Linear modules (a custom head computes itself), all
    with a bias or all without."""
    return all(type(module) is torch.nn.Linear for module in modules) \
        and len({module.bias is None for module in modules}) == 1


def packed(modules: Tuple[torch.nn.Linear, ...]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The oneDNN-packed copy of the modules' weights stacked by rows, and their stacked biases (None without),
    made on first use; a group whose weights changed since (a head trained in place) is packed again."""
    groups = _PACKED.setdefault(modules[0], {})
    members = tuple(id(m) for m in modules)
    stamp = tuple((m.weight.data_ptr(), m.weight._version) for m in modules)
    entry = groups.get(members)
    if entry is None or entry[0] != stamp:
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in modules])
            bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
            entry = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight, HINT), bias)
        groups[members] = entry
    return entry[1], entry[2]

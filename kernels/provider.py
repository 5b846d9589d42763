"""``backend.kernels``: which provider runs the sampling filters and rejection samplers, and when one is refused.

``torch`` (the default) is the decoding core's own torch code: no provider. ``triton`` hands the pipeline's
fused filters (temperature, top-k, top-p, min-p) and the verifier's chain and tree rules to the Triton
kernels of this package; the repetition penalty stays in torch, before the kernel (announced once per run).
A strategy the kernels cannot run exactly is refused at validation, one line naming the key: typical_p,
epsilon_cutoff and eta_cutoff (no kernel fuses them) and acceptance=typical (no kernel implements it), so a
run never mixes providers silently. Triton needs a CUDA device; on CPU only its interpreter runs it
(``TRITON_INTERPRET=1``: slow, for tests and CI, no speed claim), and elsewhere ``triton`` is refused.

:class:`ReferenceKernels` is the same interface on the torch references: the core's provider plumbing can be
tested without Triton, and it must give exactly the tokens of the torch path.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

from decodelab.config import BackendConfig, StrategyConfig
from decodelab.decoding.logits import LogitsPipeline, kernel_problem
from decodelab.decoding.types import Kernels
from decodelab.errors import ConfigError, notice
from decodelab.kernels.logits_reference import reference_warp
from decodelab.kernels.rejection_reference import chain_reference, tree_reference

KEY = "backend.kernels"


def check_kernels(backend: BackendConfig, strategy: StrategyConfig) -> None:
    """Refuse ``backend.kernels=triton`` for a strategy it cannot run exactly, or where Triton cannot run
    (ConfigError: one line naming the key and what to do)."""
    if backend.kernels != "triton":
        return
    problem = kernel_problem(LogitsPipeline(strategy))
    if problem:
        field, reason = problem
        off = getattr(StrategyConfig(), field)
        raise ConfigError(f"strategy.{field}", f"{reason} under {KEY}=triton; set strategy.{field}={off} "
                                               f"or {KEY}=torch")
    device = backend.device.split(":")[0]
    if device == "mps":
        raise ConfigError(KEY, "triton has no mps backend; use backend.kernels=torch")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(KEY, "triton on backend.device=cpu runs only in Triton's interpreter (slow, for tests): "
                               "set TRITON_INTERPRET=1, or use backend=cuda, or backend.kernels=torch")
    try:
        importlib.import_module("triton")
    except ImportError as err:
        raise ConfigError(KEY, f"triton is not importable ({err}); pip install 'decodelab[triton]' (Linux), "
                               "or use backend.kernels=torch") from None


def build_kernels(backend: BackendConfig, strategy: StrategyConfig) -> Optional[Kernels]:
    """The provider for a run (None for torch), after :func:`check_kernels`."""
    check_kernels(backend, strategy)
    if backend.kernels != "triton":
        return None
    if strategy.repetition_penalty != 1.0:
        notice("backend.kernels=triton: strategy.repetition_penalty runs in torch, before the fused kernel")
    return TritonKernels()


class TritonKernels:
    """The Triton kernels (on CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def __init__(self):
        # Imported here: this module must import (and check_kernels refuse) without triton.
        from decodelab.kernels import logits, rejection

        self.warp = logits.fused_probs
        self.chain = rejection.chain_rejection_sample
        self.tree = rejection.tree_rejection_sample


class ReferenceKernels:
    """The same interface on the torch references (tests; any device torch runs on)."""

    name = "reference"
    warp = staticmethod(reference_warp)
    chain = staticmethod(chain_reference)
    tree = staticmethod(tree_reference)

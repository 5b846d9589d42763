"""``decodelab::linear``: the few-row CPU matmul of ``kernels/linear.cpp``, built on first use and cached.

Why a kernel of our own: a decode step multiplies one row (or a short draft) by every weight, so it is bound by
how fast the weights stream. MKL's small-M sgemm and oneDNN's packed matmul read SmolLM2's layer matrices at 9-21 GB/s
where a plain sum over the same bytes reads 28-48 (benchmarks/README.md, 'Where a oneDNN step goes'); the kernel
streams each weight row once for all rows, in the module's own layout (no packed copy), one call per group.

The library is compiled with the machine's C++ compiler (``FLAGS``) through
``torch.utils.cpp_extension`` into ``$DECODELAB_CACHE/kernels/`` (default ``~/.cache/decodelab``), in a folder
named by the torch version and a hash of the source, the flags and the CPU's instruction sets, so a binary is
never loaded on a CPU it was not built for; the first build took 10-23 s on 2 cores here, later processes load it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

SOURCE = Path(__file__).with_name("linear.cpp")
# -fopenmp: at::parallel_for is a header template, so the threads are this library's own OpenMP region (the
# intra-op pool's size, torch.set_num_threads, applies); without it the loop runs on one core.
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp"]


def problem() -> Optional[str]:
    """Why the kernel cannot be built here, or None when it can (a C++ compiler and ninja, as torch's builder needs)."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), so a cache shared between machines never mixes builds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    """Where this source, these flags, this torch and this CPU's build lives."""
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), torch.__version__, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(os.environ.get("DECODELAB_CACHE", "~/.cache/decodelab")))
    return cache / "kernels" / f"linear-{key}"


@functools.lru_cache(maxsize=None)
def load() -> float:
    """Build (first time on this machine) and load the library; the seconds it took. Raises when it cannot."""
    from torch.utils.cpp_extension import load as build

    start = time.perf_counter()
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    build(name="decodelab_linear", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
          build_directory=str(folder), is_python_module=False, verbose=False)
    return time.perf_counter() - start


def linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] = (),
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``cat([x W_g^T + b_g for each weight g], -1) (+ residual)`` in float32 on CPU (after :func:`load`)."""
    return torch.ops.decodelab.linear(x, list(weights), list(biases), residual)

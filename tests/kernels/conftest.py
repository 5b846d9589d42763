"""Kernel tests run in Triton's interpreter on CPU tensors, or compiled on a CUDA device when there is one and
TRITON_INTERPRET is not set. Decided here, before any test module imports a kernel: a ``@triton.jit`` function
reads TRITON_INTERPRET when it is defined. (The variable then stays set for the rest of the session.)"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")

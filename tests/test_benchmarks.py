"""The roofline benchmark runs end to end on a tiny model, the way benchmarks/gpu_check.sh calls it (a smoke test:
its figures are measured by running it, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from decodelab.kernels import linear as kernel

ROOT = Path(__file__).resolve().parents[1]
# backend.linear=gemv's kernel needs a C++ compiler and ninja (present on this project's machines).
GEMV = kernel.problem() is None


def test_forward_roofline_runs_with_overrides(tmp_path):
    out = tmp_path / "roofline.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "forward_roofline.py"), "--repeats", "1",
                           "--sizes", "1,2", "--paths", "dynamic,static" + (",gemv" if GEMV else ""), "--out", str(out),
                           "model=tiny-random", "model.num_layers=3", "backend.threads=1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["paths"]) == {"dynamic", "static"} | ({"gemv"} if GEMV else set()) and result["floor_s"] > 0
    for path in set(result["paths"]) - {"dynamic"}:
        assert result["paths"][path]["max_abs_logit_diff"] < 1e-4  # the same logits as the dynamic path
    assert "cpu_isa" in result["fingerprint"] and "fraction of limit" in proc.stdout


@pytest.mark.skipif(not GEMV, reason=f"gemv's kernel cannot be built here: {kernel.problem()}")
def test_linear_kernels_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "linear.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear_kernels.py"), "--model", "tiny-random",
                           "--rows", "1,3", "--repeats", "4", "--copies-mb", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["matrices"]) == {"qkv", "o", "gate_up", "down", "head"} and result["bandwidth_gb_s"] > 0
    assert set(result["matrices"]["o"]["rows"]["3"]) == {"sum", "F.linear", "onednn", "gemv"}
    assert "gemv vs onednn" in proc.stdout

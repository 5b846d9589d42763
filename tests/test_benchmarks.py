"""The roofline benchmark runs end to end on a tiny model, the way benchmarks/gpu_check.sh calls it (a smoke test:
its figures are measured by running it, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_forward_roofline_runs_with_overrides(tmp_path):
    out = tmp_path / "roofline.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "forward_roofline.py"), "--repeats", "1",
                           "--sizes", "1,2", "--paths", "dynamic,static", "--out", str(out),
                           "model=tiny-random", "model.num_layers=3", "backend.threads=1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["paths"]) == {"dynamic", "static"} and result["floor_s"] > 0
    assert result["paths"]["static"]["max_abs_logit_diff"] < 1e-4  # the same logits as the dynamic path
    assert "cpu_isa" in result["fingerprint"] and "fraction of limit" in proc.stdout

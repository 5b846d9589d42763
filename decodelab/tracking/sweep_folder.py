"""The on-disk layout of a sweep (a Hydra multirun), shared by the sweep callback, report and resume.

::

    <sweep_dir>/
      sweep.json            name, start time, overrides, MLflow parent run (id, uri, experiment), W&B group
      <job>/                a run folder (see decodelab/tracking/local.py), one per job
      <job>/reused.json     instead of a run, when resume found this config already finished elsewhere:
                            {"run_dir": <that run folder>, "config_hash": ...}
      sweep_summary.json    written when the multirun ends: one row per job (status, error, run folder)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

SWEEP_FILE = "sweep.json"
SWEEP_SUMMARY_FILE = "sweep_summary.json"
REUSED_FILE = "reused.json"
# The sweep folder a job belongs to, set for every job of a multirun: it scopes the AR baseline's timings to
# the sweep (decodelab/experiment/runner.py).
SWEEP_DIR_ENV = "DECODELAB_SWEEP_DIR"


def read_sweep_meta(sweep_dir: Path) -> Dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def job_dirs(sweep_dir: Path) -> List[Path]:
    """Job folders of a sweep in job order (numeric names first, then by name)."""
    folders = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and
               ((p / "config.yaml").is_file() or (p / REUSED_FILE).is_file())]
    return sorted(folders, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def run_dirs(sweep_dir: Path) -> List[Path]:
    """The run folder behind every job, following ``reused.json`` to the earlier run a resumed job stands for."""
    out = []
    for folder in job_dirs(sweep_dir):
        reused = folder / REUSED_FILE
        if reused.is_file():
            target = Path(json.loads(reused.read_text(encoding="utf-8"))["run_dir"])
            if (target / "config.yaml").is_file():
                out.append(target)
            continue
        out.append(folder)
    return out

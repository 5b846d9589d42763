"""The on-disk layout of a sweep (a Hydra multirun) and its one reader, shared by the sweep callback, report,
reproduce, simulate and resume.

::

    <sweep_dir>/
      sweep.json            name, start time, overrides, MLflow parent run (id, uri, experiment), W&B group
      <job>/                a run folder (see decodelab/tracking/run_folder.py), one per job
      <job>/.hydra/         Hydra's record of the job (overrides.yaml: the job's overrides)
      <job>/reused.json     instead of a run, when resume found this config already finished elsewhere:
                            {"run_dir": <that run folder>, "config_hash": ...}
      sweep_summary.json    written when the multirun ends: one row per job (status, error, run folder)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from decodelab.tracking.run_folder import CONFIG_FILE, read_json

SWEEP_FILE = "sweep.json"
SWEEP_SUMMARY_FILE = "sweep_summary.json"
REUSED_FILE = "reused.json"
# The sweep folder a job belongs to, set for every job of a multirun: it scopes the AR baseline's timings to
# the sweep (decodelab/experiment/runner.py).
SWEEP_DIR_ENV = "DECODELAB_SWEEP_DIR"


def is_sweep(folder: Path) -> bool:
    """A sweep folder: written by the sweep callback, or at least by Hydra's multirun."""
    return (Path(folder) / SWEEP_FILE).is_file() or (Path(folder) / "multirun.yaml").is_file()


def read_sweep_meta(sweep_dir: Path) -> Dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_FILE
    return read_json(path) if path.is_file() else {}


def read_sweep_summary(sweep_dir: Path) -> List[Dict[str, Any]]:
    """The job rows of sweep_summary.json ([] before the multirun has ended)."""
    path = Path(sweep_dir) / SWEEP_SUMMARY_FILE
    return list(read_json(path)["jobs"]) if path.is_file() else []


def reused(job_dir: Path) -> Optional[Dict[str, Any]]:
    """reused.json of a job that resume satisfied with an earlier run, else None."""
    path = Path(job_dir) / REUSED_FILE
    return read_json(path) if path.is_file() else None


def job_overrides(job_dir: Path) -> List[str]:
    """The overrides Hydra recorded for a job ([] when it recorded none)."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text(encoding="utf-8")) or []) if path.is_file() else []


def job_dirs(sweep_dir: Path) -> List[Path]:
    """Job folders of a sweep in job order (numeric names first, then by name)."""
    folders = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and
               ((p / CONFIG_FILE).is_file() or (p / REUSED_FILE).is_file())]
    return sorted(folders, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def run_dirs(sweep_dir: Path) -> List[Path]:
    """The run folder behind every job, following ``reused.json`` to the earlier run a resumed job stands for."""
    out = []
    for folder in job_dirs(sweep_dir):
        earlier = reused(folder)
        if earlier is None:
            out.append(folder)
        elif (Path(earlier["run_dir"]) / CONFIG_FILE).is_file():
            out.append(Path(earlier["run_dir"]))
    return out


# Where `decodelab run -m` and `decodelab sweep NAME` put sweep folders (relative to the working directory).
MULTIRUN_DIR = Path("multirun")


def named_sweeps(name: str, root: Path = MULTIRUN_DIR) -> List[Path]:
    """The sweep folders of the named sweep ``root/name/<date>_<time>_<id>/``, oldest first (the names sort by
    time)."""
    folder = Path(root) / name
    if "/" in name or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (is_sweep(p) or job_dirs(p)))


def sweep_names(root: Path = MULTIRUN_DIR) -> List[str]:
    """Names of the named sweeps under ``root`` that hold at least one sweep folder."""
    if not Path(root).is_dir():
        return []
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and named_sweeps(p.name, root))


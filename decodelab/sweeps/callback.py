"""Hydra callback for multiruns: one MLflow parent run and one W&B group per sweep, and a sweep summary.

Known pains of Hydra sweeps that this avoids: MLflow parent runs do not cross
processes (the parent is created here, when the multirun starts, and its id is written to
``<sweep_dir>/sweep.json`` and the environment, so jobs in any launcher's processes log as children),
and W&B runs merge (each job finishes its own run; the sweep only names their group).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from decodelab.tracking.run_folder import UNFINISHED, UNREADABLE, RunFolder, plain, write_json
from decodelab.tracking.sweep_folder import (SWEEP_DIR_ENV, SWEEP_FILE, SWEEP_SUMMARY_FILE, job_dirs, job_overrides,
                                             read_sweep_meta, read_sweep_summary, reused)
from decodelab.tracking.mlflow_remote import PARENT_RUN_ENV
from decodelab.tracking.wandb_remote import GROUP_ENV as WANDB_GROUP_ENV
from decodelab.errors import warn

SWEEP_NAME_ENV = "DECODELAB_SWEEP_NAME"
# The sweep folder (and report) of the multirun that ran last in this process: the CLI prints its summary and
# exits non-zero when jobs failed.
LAST_SWEEP: Dict[str, Optional[Path]] = {"dir": None, "report": None}
# Job statuses that make a sweep's command fail (REUSED and FINISHED jobs have results).
FAILED_STATUSES = ("FAILED", UNFINISHED, UNREADABLE)


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.parent: Optional[Dict[str, str]] = None
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        LAST_SWEEP["dir"] = sweep_dir
        self.started = time.time()
        name = os.environ.get(SWEEP_NAME_ENV) or sweep_dir.name
        group = f"{name}-{sweep_dir.name}" if name != sweep_dir.name else name
        meta: Dict[str, Any] = {"name": name, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "overrides": list(config.hydra.overrides.task), "wandb_group": group,
                                "sweeper": _target(config.hydra.sweeper), "launcher": _target(config.hydra.launcher)}
        self.parent = _create_parent_run(config, name, sweep_dir)
        if self.parent:
            meta.update({f"mlflow_{k}": v for k, v in self.parent.items()})
        write_json(sweep_dir / SWEEP_FILE, meta)
        adopt_sweep(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        rows = summarize_sweep(sweep_dir)
        counts: Dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        summary = {"sweep_dir": str(sweep_dir), "wall_s": time.time() - self.started, "counts": counts, "jobs": rows}
        write_json(sweep_dir / SWEEP_SUMMARY_FILE, summary)
        report = _write_report(sweep_dir)
        self._finish_parent(sweep_dir, counts)
        LAST_SWEEP["report"] = report
        leave_sweep()

    def _finish_parent(self, sweep_dir: Path, counts: Dict[str, int]) -> None:
        if not self.parent:
            return
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=self.parent["tracking_uri"])
            run_id = self.parent["parent_run_id"]
            for key, value in counts.items():
                client.log_metric(run_id, f"jobs_{key.lower()}", value)
            client.log_artifact(run_id, str(sweep_dir / SWEEP_SUMMARY_FILE))
            client.set_terminated(run_id, "FINISHED")
        except Exception as err:  # noqa: BLE001 - the local summary is the record; MLflow is best effort
            warn(f"could not finish the MLflow parent run: {err}")


def adopt_sweep(sweep_dir: Path) -> None:
    """Hand the sweep's parent run and W&B group to this process (a job in any launcher's process; a
    reused worker process must not keep those of an earlier sweep)."""
    meta = read_sweep_meta(sweep_dir)
    os.environ[SWEEP_DIR_ENV] = str(sweep_dir)
    for env, key in ((PARENT_RUN_ENV, "mlflow_parent_run_id"), (WANDB_GROUP_ENV, "wandb_group")):
        if meta.get(key):
            os.environ[env] = meta[key]
        else:
            os.environ.pop(env, None)


def leave_sweep() -> None:
    for env in (PARENT_RUN_ENV, WANDB_GROUP_ENV, SWEEP_NAME_ENV, SWEEP_DIR_ENV):
        os.environ.pop(env, None)


def summarize_sweep(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One row per job folder: status FINISHED | FAILED | UNFINISHED | UNREADABLE | REUSED, error, run folder,
    overrides."""
    from decodelab.analysis.report import load_job

    rows = []
    for folder in job_dirs(sweep_dir):
        row: Dict[str, Any] = {"job": folder.name, "overrides": job_overrides(folder), "run_dir": str(folder),
                               "status": UNFINISHED, "error": None}
        earlier = reused(folder)
        if earlier is not None:
            row.update(status="REUSED", run_dir=earlier["run_dir"], config_hash=earlier.get("config_hash"))
        else:
            job = load_job(folder, folder.name)  # the report's reading of a job folder: one rule for both
            row.update(status=job.status, error=job.error)
            if job.status == UNFINISHED:
                row["error"] = "no summary.json: the job was killed or is still running"
            for key in ("speedup", "throughput_tok_s", "mean_accepted_length", "acceptance_rate", "lossless_rate"):
                if key in job.summary:
                    row[key] = job.summary[key]
        tracking = RunFolder(folder).tracking()
        if tracking:
            row.setdefault("config_hash", tracking.get("tags", {}).get("config_hash"))
        rows.append(row)
    return rows


def _target(node: Any) -> str:
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


def _create_parent_run(config: DictConfig, name: str, sweep_dir: Path) -> Optional[Dict[str, str]]:
    """The MLflow parent run of the sweep, when the sweep logs to MLflow; None otherwise or when MLflow is down."""
    mlflow_cfg = OmegaConf.select(config, "tracking.mlflow")
    if mlflow_cfg is None:
        return None
    try:
        from decodelab.config import MlflowConfig
        from decodelab.tracking.mlflow_remote import MlflowRemote

        remote = MlflowRemote(MlflowConfig(**OmegaConf.to_container(mlflow_cfg, resolve=True)))
        experiment_id = remote.connect()
        run = remote.client.create_run(experiment_id, run_name=f"sweep:{name}",
                                       tags={"decodelab.sweep_dir": str(sweep_dir), "decodelab.sweep": name,
                                             "decodelab.overrides": " ".join(config.hydra.overrides.task)[:5000]})
        uri, experiment = _absolute_sqlite(remote.cfg.tracking_uri), remote.cfg.experiment
        return {"parent_run_id": run.info.run_id, "tracking_uri": uri, "experiment": experiment}
    except Exception as err:  # noqa: BLE001 - jobs still log locally (and as top-level MLflow runs)
        warn(f"could not create the MLflow parent run ({type(err).__name__}: {err}); jobs log without a parent")
        return None


def _absolute_sqlite(uri: str) -> str:
    """A relative sqlite URI made absolute, so sweep.json names the same store from any directory."""
    from decodelab.tracking.mlflow_remote import sqlite_file

    db = sqlite_file(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def _write_report(sweep_dir: Path) -> Optional[Path]:
    """Markdown/HTML report with plots (decodelab/sweep_report.py); a failing report never fails the sweep."""
    try:
        from decodelab.analysis.report import write_report

        written = write_report(sweep_dir, None)
        return Path(written.get("markdown", sweep_dir / "report")) if isinstance(written, dict) else None
    except Exception as err:  # noqa: BLE001
        warn(f"sweep report failed ({type(err).__name__}: {err}); run: decodelab report {sweep_dir}")
        return None


def sweep_failures(sweep_dir: Path) -> List[Dict[str, Any]]:
    return [plain(r) for r in read_sweep_summary(sweep_dir) if r["status"] in FAILED_STATUSES]

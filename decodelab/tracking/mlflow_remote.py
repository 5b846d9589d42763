"""MLflow remote: one MLflow run per decodelab run, through ``MlflowClient`` (no fluent global state).

The explicit client keeps several runs in one process (sweeps, tests) independent of ``mlflow``'s
active-run stack, and lets a run nest under a parent created in another process
(``DECODELAB_MLFLOW_PARENT_RUN_ID``, set by the sweep callback).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import unquote, urlparse

from decodelab.config import MlflowConfig
from decodelab.errors import UserError

PARENT_RUN_ENV = "DECODELAB_MLFLOW_PARENT_RUN_ID"
RUN_DIR_TAG = "decodelab.run_dir"
# Fail fast on an unreachable server instead of mlflow's default 7 retries with backoff and 120 s timeout;
# applied with setdefault so a user's own values win.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

# mlflow limits (mlflow.utils.validation); repeated so importing this module does not import mlflow.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def apply_http_defaults() -> None:
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def clean_key(key: str) -> str:
    """A key mlflow accepts: allowed characters only, no path tricks, within the length limit."""
    key = _BAD_KEY_CHARS.sub("_", str(key)).strip("/") or "_"
    key = re.sub(r"/+", "/", key)
    key = "/".join(part if part not in (".", "..") else "_" for part in key.split("/"))
    return key[:MAX_KEY_LENGTH]


def flatten(data: Any, sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level of joined keys; lists stay leaves."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def config_params(resolved_config: dict) -> dict[str, str]:
    """Flattened config as mlflow params: ``model.name`` keys, str() values cut to mlflow's limit."""
    return {clean_key(k): str(v)[:MAX_PARAM_VALUE_LENGTH] for k, v in flatten(resolved_config, ".").items()}


def summary_metrics(summary: dict) -> dict[str, float]:
    """Numeric summary entries (nested dicts joined with "/"); bools count as 0/1."""
    metrics = {}
    for key, value in flatten(summary, "/").items():
        if isinstance(value, (int, float)):
            metrics[clean_key(key)] = float(value)
    return metrics


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def sqlite_file(tracking_uri: str) -> Optional[Path]:
    """The database file of a sqlite tracking URI (None for other stores); ``sqlite:///rel.db`` is relative
    to the working directory, ``sqlite:////abs.db`` absolute."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(tracking_uri).path)
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        path = path.lstrip("/")
    return Path(path).expanduser() if path and path != ":memory:" else None


def existing_store_client(tracking_uri: str, what: str = "tracking URI"):
    """A client for a store that exists: MLflow would silently create a missing sqlite file, empty."""
    from mlflow import MlflowClient

    db = sqlite_file(tracking_uri)
    if db is not None and not db.is_file():
        raise UserError(f"{what} {tracking_uri}: no MLflow database at {db}; pass the store that logged the run")
    apply_http_defaults()
    return MlflowClient(tracking_uri=tracking_uri)


def _sqlite_artifact_root(tracking_uri: str) -> Optional[str]:
    """Artifacts beside the sqlite file (``<dir>/mlartifacts``) rather than mlflow's cwd-relative default."""
    db = sqlite_file(tracking_uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None


class MlflowRemote:
    """Creates the run at start, sends params/tags then; metrics, artifacts and status at finish."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig):
        self.cfg = cfg
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.last_step = 0  # summary metrics land on the last step of a run's step series (not back at 0)

    def describe(self) -> dict[str, Any]:
        return {"tracking_uri": self.cfg.tracking_uri, "experiment": self.cfg.experiment, "run_id": self.run_id}

    def connect(self) -> str:
        """Open the client; returns the experiment id (the experiment is created on first use)."""
        from mlflow import MlflowClient

        apply_http_defaults()
        self.client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        return self._experiment_id()

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(
                self.cfg.experiment, artifact_location=_sqlite_artifact_root(self.cfg.tracking_uri))
        except MlflowException:  # created concurrently by another job of the sweep
            experiment = self.client.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _run_tags(self, run_name: str, tags: dict[str, str]) -> dict[str, str]:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        wanted = {clean_key(k): str(v)[:MAX_TAG_VALUE_LENGTH] for k, v in tags.items()}
        wanted[MLFLOW_RUN_NAME] = run_name
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            wanted[MLFLOW_PARENT_RUN_ID] = parent
        try:  # user, source and git tags, as mlflow.start_run would add them
            from mlflow.tracking.context.registry import resolve_tags

            return {k: str(v)[:MAX_TAG_VALUE_LENGTH] for k, v in resolve_tags(wanted).items()}
        except Exception:  # noqa: BLE001 - context tags are a nicety
            return wanted

    def start(self, run_name: str, tags: dict[str, str], resolved_config: dict, fingerprint: dict,
              run_dir: Path) -> None:
        from mlflow.entities import Param

        experiment_id = self.connect()
        all_tags = {**tags, RUN_DIR_TAG: str(run_dir), **_fingerprint_tags(fingerprint)}
        run = self.client.create_run(experiment_id, run_name=run_name, tags=self._run_tags(run_name, all_tags))
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in config_params(resolved_config).items()]
        for chunk in _chunks(params, PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_sample(self, record: dict) -> None:
        """Nothing per sample: the local jsonl carries them and is uploaded at finish."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One point of each metric's step series (loss curves)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.last_step = max(self.last_step, step)
        rows = [Metric(k, v, now, step) for k, v in summary_metrics(metrics).items()]
        for chunk in _chunks(rows, METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def finish(self, summary: dict, status: str, error: Optional[str], files: list[Path],
               samples: list[dict]) -> None:
        if self.run_id is None:
            return
        status = status if status in RUN_STATUSES else "FAILED"
        try:
            self._log_summary(summary, error)
            self._log_files(files)
        finally:
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass

    def _log_summary(self, summary: dict, error: Optional[str]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, self.last_step) for k, v in summary_metrics(summary).items()]
        for chunk in _chunks(metrics, METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)
        if error:
            self.client.log_batch(self.run_id, tags=[RunTag("decodelab.error", error[:MAX_TAG_VALUE_LENGTH])])

    def _log_files(self, files: list[Path]) -> None:
        for path in files:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path))


def _fingerprint_tags(fingerprint: dict) -> dict[str, str]:
    """A few searchable facts; the full fingerprint is the fingerprint.json artifact."""
    gpus = fingerprint.get("gpus") or []
    facts = {"decodelab.git_commit": fingerprint.get("git_commit"),
             "decodelab.hostname": fingerprint.get("hostname"),
             "decodelab.cpu": fingerprint.get("cpu_model"),
             "decodelab.gpu": ", ".join(str(g.get("name")) for g in gpus if isinstance(g, dict)) or None}
    return {k: str(v) for k, v in facts.items() if v}

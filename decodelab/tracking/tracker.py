"""Where results go: the local run folder always, MLflow and W&B when enabled.

The local folder is the source of truth (see ``run_folder.py``). Remotes are best effort: any exception from
one disables it for the rest of the run, is recorded in ``remote_failures`` and printed once, and the run
goes on; ``decodelab upload <run_dir>`` replays the folder to the remotes later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Protocol

from decodelab.config import TrackingConfig
from decodelab.errors import UserError, warn
from decodelab.tracking.run_folder import CONFIG_FILE, METRICS_FILE, RUN_FILES, LocalRun, RunFolder

__all__ = ["Tracker", "upload_run", "build_remotes"]

_MAX_ERROR_CHARS = 300


class Remote(Protocol):
    """What a remote tracker implements; every method may raise, the fan-out contains it."""

    name: str

    def start(self, run_name: str, tags: dict[str, str], resolved_config: dict, fingerprint: dict,
              run_dir: Path) -> None: ...

    def log_sample(self, record: dict) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, summary: dict, status: str, error: Optional[str], files: list[Path],
               samples: list[dict]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def build_remotes(tracking_cfg: Optional[TrackingConfig]) -> list[Remote]:
    """The enabled remotes; imports nothing heavy (mlflow/wandb load only when a run starts)."""
    remotes: list[Remote] = []
    if tracking_cfg is None:
        return remotes
    if tracking_cfg.mlflow is not None:
        from decodelab.tracking.mlflow_remote import MlflowRemote

        remotes.append(MlflowRemote(tracking_cfg.mlflow))
    if tracking_cfg.wandb is not None and tracking_cfg.wandb.mode != "disabled":
        from decodelab.tracking.wandb_remote import WandbRemote

        remotes.append(WandbRemote(tracking_cfg.wandb))
    return remotes


def _describe_error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text[:_MAX_ERROR_CHARS]


class _Fanout:
    """Calls every live remote; the first exception from a remote disables it (one warning, no raise)."""

    def __init__(self, remotes: list[Remote]):
        self.remotes = list(remotes)
        self.live = list(remotes)
        self.failures: list[str] = []

    def call(self, method: str, *args: Any) -> None:
        for remote in list(self.live):
            try:
                getattr(remote, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a remote must never fail the run
                self._disable(remote, method, exc)

    def _disable(self, remote: Remote, method: str, exc: Exception) -> None:
        self.live.remove(remote)
        message = f"{remote.name}: {_describe_error(exc)}"
        self.failures.append(message)
        warn(f"{message} (during {method}; {remote.name} disabled for this run, local files are kept)")
        if method != "finish":
            self._abandon(remote)

    @staticmethod
    def _abandon(remote: Remote) -> None:
        """Best effort to close a half-open remote run (an open W&B run would block process exit)."""
        try:
            remote.finish({}, "FAILED", "remote logging failed; see decodelab upload", [], [])
        except Exception:  # noqa: BLE001
            pass

    def describe(self) -> dict[str, Any]:
        out = {}
        for remote in self.remotes:
            try:
                out[remote.name] = remote.describe()
            except Exception:  # noqa: BLE001
                out[remote.name] = {}
        return out


class Tracker:
    """Fans out to the local run folder (always; the source of truth) and the enabled remotes."""

    def __init__(self, run_dir: str | Path, tracking_cfg: TrackingConfig, run_name: str,
                 tags: dict[str, str] | None = None):
        self.local = LocalRun(run_dir)
        self.run_dir = self.local.run_dir
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._fanout = _Fanout(build_remotes(tracking_cfg))
        self.remote_failures: list[str] = self._fanout.failures

    def start(self, resolved_config: dict, fingerprint: dict) -> None:
        """Write config.yaml and fingerprint.json, then open the remote runs."""
        self.local.write_start(resolved_config, fingerprint)
        self._fanout.call("start", self.run_name, self.tags, resolved_config, fingerprint, self.run_dir)
        self._write_tracking([])

    def log_sample(self, record: dict) -> None:
        """Append one durable line to samples.jsonl; remotes get at most step metrics."""
        self.local.append_sample(record)
        self._fanout.call("log_sample", record)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Step metrics (loss curves): one durable line in metrics.jsonl, then the remotes' step series."""
        self.local.append_metrics(step, metrics)
        self._fanout.call("log_metrics", step, metrics)

    def finish(self, summary: dict, status: str = "FINISHED", error: str | None = None,
               artifacts: Iterable[Path] = ()) -> None:
        """Write summary.json, send summary, files and status to the remotes, and close them."""
        extra = [Path(a).expanduser().resolve() for a in artifacts]
        if (self.run_dir / METRICS_FILE).is_file():
            extra.append(self.run_dir / METRICS_FILE)
        self.local.write_summary(summary, status, error)
        self._write_tracking(extra)
        if self._fanout.live:
            files = [self.run_dir / name for name in RUN_FILES] + extra
            self._fanout.call("finish", summary, status, error, files, RunFolder(self.run_dir).samples())
        self._write_tracking(extra)
        if self.remote_failures:
            warn(f"remote logging incomplete; the run is complete in {self.run_dir}. "
                 f"Upload it later with: decodelab upload {self.run_dir}")

    def _write_tracking(self, artifacts: list[Path]) -> None:
        """What upload_run needs beyond the run files: name, tags, extra artifacts; plus remote ids."""
        self.local.write_tracking({"run_name": self.run_name, "tags": self.tags,
                                   "artifacts": [str(a) for a in artifacts],
                                   "remotes": self._fanout.describe(),
                                   "remote_failures": self.remote_failures})


def _read_run(folder: RunFolder) -> tuple[dict, dict, dict, dict]:
    """config, fingerprint, summary and tracking info of a run folder (missing optional files -> {})."""
    if not folder.has(CONFIG_FILE):
        raise UserError(f"{folder.path}: not a decodelab run folder (no {CONFIG_FILE})")
    summary = folder.summary()
    if summary is None:
        summary = {"status": "FAILED", "error": "no summary.json: the run did not finish"}
    return folder.config(), folder.fingerprint(), summary, folder.tracking()


def upload_run(run_dir: str | Path, tracking_cfg: TrackingConfig) -> list[str]:
    """Re-log a local run folder to the enabled remotes; returns the failures (empty on success).

    Each upload creates new remote runs (tagged ``decodelab.uploaded``), so a run whose live logging
    failed half-way can be replayed in full.
    """
    local = LocalRun(run_dir)
    folder = RunFolder(local.run_dir)
    config, fingerprint, summary, info = _read_run(folder)
    remotes = build_remotes(tracking_cfg)
    if not remotes:
        raise UserError("tracking: no remote enabled to upload to (use tracking=mlflow, tracking=wandb, ...)")
    status = str(summary.pop("status", "FINISHED"))
    error = summary.pop("error", None)
    run_name = info.get("run_name") or local.run_dir.name
    tags = {**info.get("tags", {}), "decodelab.uploaded": "true"}
    extra = [Path(a) for a in info.get("artifacts", []) if Path(a).exists()]
    fanout = _Fanout(remotes)
    fanout.call("start", run_name, tags, config, fingerprint, local.run_dir)
    for row in folder.metrics():
        step = row.pop("step", 0)
        fanout.call("log_metrics", int(step), row)
    samples = folder.samples()
    files = [local.run_dir / name for name in RUN_FILES] + extra
    fanout.call("finish", summary, status, error, files, samples)
    return fanout.failures

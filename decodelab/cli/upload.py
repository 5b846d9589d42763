"""``decodelab upload RUN_DIR [overrides]``: log a finished local run folder to the configured trackers."""

from __future__ import annotations

from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from decodelab.config import TrackingConfig
from decodelab.errors import UserError
from decodelab.experiment.compose import compose
from decodelab.tracking.tracker import upload_run


def cli(args: List[str]) -> None:
    if not args:
        raise UserError("upload needs RUN_DIR, e.g. decodelab upload runs/2026-01-01_12-00-00_ab12cd tracking=mlflow")
    run_dir = Path(args[0])
    if not (run_dir / "samples.jsonl").exists():
        raise UserError(f"RUN_DIR: {run_dir} is not a decodelab run folder (no samples.jsonl)")
    cfg = compose(args[1:])
    tracking: TrackingConfig = OmegaConf.to_object(cfg.tracking)  # type: ignore[assignment]
    failures = upload_run(run_dir, tracking)
    if failures:
        raise UserError("upload failed: " + "; ".join(failures))
    print(f"uploaded {run_dir}")

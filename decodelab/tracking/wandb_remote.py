"""Weights & Biases remote: one W&B run per decodelab run, offline unless an API key is present.

Each decodelab run creates its own W&B run (``reinit="create_new"``) and finishes it, so several runs in
one process (sweeps, tests) never merge into one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from decodelab.config import WandbConfig
from decodelab.tracking.run_folder import plain

TABLE_COLUMNS = ["id", "category", "prompt", "output", "new_tokens", "tok_s"]
MAX_TAG_LENGTH = 64  # W&B rejects longer tags
# The sweep's W&B group, set by the sweep callback (decodelab/sweep_callback.py) for every job.
GROUP_ENV = "DECODELAB_WANDB_GROUP"


def resolve_mode(mode: str) -> str:
    """``auto``: online iff WANDB_API_KEY is set, so a machine without credentials never blocks on login."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def sample_row(record: dict) -> list[Any]:
    """One table row; accepts ``turns``/``prompt`` and ``outputs``/``output`` record shapes."""
    turns = record.get("turns")
    prompt = record.get("prompt")
    if prompt is None and isinstance(turns, list) and turns:
        prompt = turns[0]
    output = record.get("output")
    outputs = record.get("outputs")
    if output is None and isinstance(outputs, list):
        output = "\n\n".join(str(o) for o in outputs)
    return [_text(record.get("id")), _text(record.get("category")), _text(prompt), _text(output),
            _number(record.get("new_tokens")), _number(record.get("tok_s"))]


def _text(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class WandbRemote:
    """Init at start, optional per-sample step metrics, summary + samples table + finish at the end."""

    name = "wandb"

    def __init__(self, cfg: WandbConfig):
        self.cfg = cfg
        self.run: Any = None

    def describe(self) -> dict[str, Any]:
        run = self.run
        return {"project": self.cfg.project, "mode": resolve_mode(self.cfg.mode),
                "run_id": getattr(run, "id", None), "dir": getattr(run, "dir", None)}

    def start(self, run_name: str, tags: dict[str, str], resolved_config: dict, fingerprint: dict,
              run_dir: Path) -> None:
        import wandb

        base = Path(self.cfg.dir).expanduser() if self.cfg.dir else run_dir
        base.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group or os.environ.get(GROUP_ENV), name=run_name,
            dir=str(base), config=plain(resolved_config), mode=resolve_mode(self.cfg.mode),
            tags=[f"{k}={v}"[:MAX_TAG_LENGTH] for k, v in tags.items()], notes=f"decodelab run_dir: {run_dir}",
            reinit="create_new",
            # The CLI owns the terminal (progress bars); the console log is not part of the record.
            settings=wandb.Settings(console="off"),
        )
        self.run.summary["fingerprint"] = plain(fingerprint)

    def log_sample(self, record: dict) -> None:
        """Per-sample step metrics (cheap, batched by W&B); the sample text goes in the table at finish."""
        metrics = {f"sample/{k}": v for k in ("new_tokens", "tok_s", "wall_s", "ttft_s")
                   if (v := _number(record.get(k))) is not None}
        if metrics:
            self.run.log(metrics)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One point of each metric's step series (loss curves), at the run's own step."""
        self.run.log({k: v for k, v in metrics.items() if _number(v) is not None}, step=step)

    def finish(self, summary: dict, status: str, error: Optional[str], files: list[Path],
               samples: list[dict]) -> None:
        if self.run is None:
            return
        import wandb

        exit_code = 0 if status == "FINISHED" else 1
        try:
            self.run.summary.update({**plain(summary), "status": status, "error": error})
            if samples:
                table = wandb.Table(columns=TABLE_COLUMNS, data=[sample_row(r) for r in samples])
                self.run.log({"samples": table})
        finally:
            self.run.finish(exit_code=exit_code)

"""``decodelab run [overrides] [-m]``: a Hydra app over conf/.

Before Hydra starts, every job's overrides are composed and validated, so bad input fails in one line with
exit code 2 before any model is loaded or any run is recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from decodelab.cli import fail
from decodelab.cli.table import print_summary
from decodelab.errors import UserError, notice
from decodelab.experiment.compose import conf_dir, register_configs, register_resolvers, validate_overrides


def cli(args: List[str]) -> None:
    from hydra._internal.utils import get_args_parser

    register_resolvers()
    parsed = get_args_parser().parse_args(args)  # Hydra's own flags: --cfg job, -m, --info, ...
    if not (parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion):
        validate_overrides(parsed.overrides, multirun=parsed.multirun)
    _hydra_app(args)


def _hydra_app(args: List[str]) -> None:
    import hydra

    from decodelab.sweeps.callback import LAST_SWEEP

    register_configs()
    LAST_SWEEP["dir"] = None

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg) -> dict:
        return run_job(cfg)

    sys.argv = ["decodelab"] + args
    app()
    _after_sweep()


def run_job(cfg) -> dict:
    """The Hydra task function: one run. In a multirun a failing job (bad combination, exception, out of
    memory) is recorded as FAILED (run folder, MLflow, sweep summary) and returns, so the other jobs go on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from decodelab.experiment.runner import record_failure, run

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        from decodelab.sweeps.callback import adopt_sweep

        sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
        adopt_sweep(sweep_dir)  # parent run and W&B group, also in launcher processes that lack the env
        if cfg.get("resume_dir") is None:
            cfg = OmegaConf.merge(cfg, {"resume_dir": str(sweep_dir.parent)})
    try:
        return run(cfg, show=print_summary)
    except Exception as err:  # noqa: BLE001 - isolate the job; KeyboardInterrupt still stops the sweep
        if not multirun:
            if isinstance(err, UserError):
                fail(str(err))
            raise
        error = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        print(f"decodelab: job {hydra_cfg.job.num} failed: {error}", file=sys.stderr, flush=True)
        if not getattr(err, "decodelab_recorded", False):
            record_failure(cfg, hydra_cfg.runtime.output_dir, error)
        return {"status": "FAILED", "error": error}


def _after_sweep() -> None:
    """After a multirun: one line of job counts, one per failed job, and a non-zero exit when any job failed
    (their results and errors are on record)."""
    from decodelab.sweeps.callback import LAST_SWEEP, sweep_failures
    from decodelab.tracking.sweep_folder import SWEEP_SUMMARY_FILE, read_sweep_meta, read_sweep_summary

    sweep_dir, report = LAST_SWEEP["dir"], LAST_SWEEP["report"]
    if sweep_dir is None:
        return
    counts: dict = {}
    for row in read_sweep_summary(sweep_dir):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    line = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    notice(f"sweep {sweep_dir}: {line or 'no jobs'}; summary: {sweep_dir / SWEEP_SUMMARY_FILE}"
           + (f"; report: {report}" if report else ""))
    failed = sweep_failures(sweep_dir)
    for row in failed:
        notice(f"job {row['job']} ({' '.join(row['overrides'])}) {row['status']}: {row['error']}")
    if failed and "optuna" in str(read_sweep_meta(sweep_dir).get("sweeper", "")):
        return  # a search records failed trials as FAIL and goes on; they are listed above and in the study
    if failed:
        print(f"decodelab: error: {len(failed)} job(s) of the sweep failed; see {sweep_dir}/sweep_summary.json",
              file=sys.stderr)
        sys.exit(1)



"""Command line: ``decodelab run|sweep|list|upload|report|reproduce|simulate``.

``run`` is a Hydra app (standard override grammar, ``-m`` for multirun, ``--cfg job`` ...). Before Hydra
starts, every job's overrides are composed and validated here, so bad input fails in one line with exit
code 2 before any model is loaded or any run is recorded.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from decodelab.errors import UserError

GROUPS = ("model", "backend", "drafter", "strategy", "task", "logger", "launcher", "experiment")
USAGE = """usage: decodelab COMMAND [args]

commands:
  run [overrides] [-m]   run one composition (or a Hydra multirun with -m); e.g. decodelab run experiment=quickstart
  sweep NAME [overrides]  run a named sweep or search from sweeps/ (e.g. decodelab sweep drafters task.limit=2)
  list                   print every config group and its options
  upload RUN_DIR [overrides]   log a finished local run folder to the configured trackers (logger=...)
  report SWEEP           write Markdown/HTML tables and PNG plots for a sweep folder or MLflow parent run id
  reproduce RUN          re-run a run folder or MLflow run id from its logged config and compare
  simulate RUN_DIR       estimate acceptance of model-free drafters from a run's recorded greedy outputs
"""

# Commands whose code lives in their own module; each module has ``cli(args: List[str]) -> None``.
DELEGATED = {"sweep": "decodelab.sweeps.launch", "report": "decodelab.analysis.report",
             "reproduce": "decodelab.analysis.reproduce", "simulate": "decodelab.analysis.simulate"}


def conf_dir() -> Path:
    """conf/ of the checkout (editable install) or the one packaged beside the code."""
    override = os.environ.get("DECODELAB_CONF_DIR")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parents[1]
    candidates += [here.parent / "conf", here / "conf"]
    for candidate in candidates:
        if (candidate / "config.yaml").exists():
            return candidate
    raise UserError(f"config folder not found (looked in {', '.join(map(str, candidates))}); set DECODELAB_CONF_DIR")


def group_options(group: str) -> List[str]:
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("uid"):
        # A short random id per run folder: jobs started in the same second never collide.
        OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            _run(rest)
        elif command == "list":
            _list()
        elif command == "upload":
            _upload(rest)
        elif command in DELEGATED:
            import importlib

            importlib.import_module(DELEGATED[command]).cli(rest)
        else:
            raise UserError(f"unknown command {command!r}; allowed: run, list, upload, {', '.join(DELEGATED)}")
    except UserError as err:
        _fail(str(err))


def _fail(message: str) -> None:
    print(f"decodelab: error: {message}", file=sys.stderr)
    sys.exit(2)


def _list() -> None:
    from decodelab.sweeps.launch import available

    for group in GROUPS:
        print(f"{group}: {', '.join(group_options(group))}")
    print(f"sweeps (decodelab sweep NAME): {', '.join(available())}")


def _run(args: List[str]) -> None:
    from decodelab.experiment.compose import validate_overrides

    from hydra._internal.utils import get_args_parser

    register_resolvers()
    parsed = get_args_parser().parse_args(args)  # Hydra's own flags: --cfg job, -m, --info, ...
    if not (parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion):
        validate_overrides(parsed.overrides, multirun=parsed.multirun)
    _hydra_app(args)


def _hydra_app(args: List[str]) -> None:
    import hydra

    from decodelab.config import register_configs
    from decodelab.sweeps.callback import LAST_SWEEP

    register_configs()
    LAST_SWEEP["dir"] = None

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg) -> dict:
        return run_job(cfg)

    sys.argv = ["decodelab"] + args
    app()
    _exit_on_failed_jobs()


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
        return run(cfg)
    except Exception as err:  # noqa: BLE001 - isolate the job; KeyboardInterrupt still stops the sweep
        if not multirun:
            if isinstance(err, UserError):
                _fail(str(err))
            raise
        error = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        print(f"decodelab: job {hydra_cfg.job.num} failed: {error}", file=sys.stderr, flush=True)
        if not getattr(err, "decodelab_recorded", False):
            record_failure(cfg, hydra_cfg.runtime.output_dir, error)
        return {"status": "FAILED", "error": error}


def _exit_on_failed_jobs() -> None:
    """After a multirun: a non-zero exit when any job failed (their results and errors are on record)."""
    from decodelab.sweeps.callback import LAST_SWEEP, sweep_failures
    from decodelab.tracking.sweep_folder import read_sweep_meta

    sweep_dir = LAST_SWEEP["dir"]
    if sweep_dir is None:
        return
    failed = sweep_failures(sweep_dir)
    if failed and "optuna" in str(read_sweep_meta(sweep_dir).get("sweeper", "")):
        return  # a search records failed trials as FAIL and goes on; they are listed above and in the study
    if failed:
        print(f"decodelab: error: {len(failed)} job(s) of the sweep failed; see {sweep_dir}/sweep_summary.json",
              file=sys.stderr)
        sys.exit(1)


def _upload(args: List[str]) -> None:
    from decodelab.experiment.compose import compose
    from decodelab.config import LoggerConfig
    from decodelab.tracking.tracker import upload_run

    if not args:
        raise UserError("upload needs RUN_DIR, e.g. decodelab upload runs/2026-01-01_12-00-00_ab12cd logger=mlflow")
    run_dir = Path(args[0])
    if not (run_dir / "samples.jsonl").exists():
        raise UserError(f"RUN_DIR: {run_dir} is not a decodelab run folder (no samples.jsonl)")
    cfg = compose(args[1:])
    logger: LoggerConfig = OmegaConf.to_object(cfg.logger)  # type: ignore[assignment]
    failures = upload_run(run_dir, logger)
    if failures:
        raise UserError("upload failed: " + "; ".join(failures))
    print(f"uploaded {run_dir}")


if __name__ == "__main__":
    main()

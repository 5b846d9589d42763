"""Command line: ``decodelab run|list|upload``.

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

GROUPS = ("model", "backend", "drafter", "strategy", "task", "logger", "experiment")
USAGE = """usage: decodelab COMMAND [args]

commands:
  run [overrides] [-m]   run one composition (or a Hydra multirun with -m); e.g. decodelab run experiment=quickstart
  list                   print every config group and its options
  upload RUN_DIR [overrides]   log a finished local run folder to the configured trackers (logger=...)
"""


def conf_dir() -> Path:
    """conf/ of the checkout (editable install) or the one packaged beside the code."""
    override = os.environ.get("DECODELAB_CONF_DIR")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
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
        else:
            raise UserError(f"unknown command {command!r}; allowed: run, list, upload")
    except UserError as err:
        _fail(str(err))


def _fail(message: str) -> None:
    print(f"decodelab: error: {message}", file=sys.stderr)
    sys.exit(2)


def _list() -> None:
    for group in GROUPS:
        print(f"{group}: {', '.join(group_options(group))}")


def _run(args: List[str]) -> None:
    from decodelab.compose import validate_overrides

    from hydra._internal.utils import get_args_parser

    register_resolvers()
    parsed = get_args_parser().parse_args(args)  # Hydra's own flags: --cfg job, -m, --info, ...
    if not (parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion):
        validate_overrides(parsed.overrides, multirun=parsed.multirun)
    _hydra_app(args)


def _hydra_app(args: List[str]) -> None:
    import hydra

    from decodelab.config import register_configs

    register_configs()

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg) -> None:
        from decodelab.runner import run

        try:
            run(cfg)
        except UserError as err:
            _fail(str(err))

    sys.argv = ["decodelab"] + args
    app()


def _upload(args: List[str]) -> None:
    from decodelab.compose import compose
    from decodelab.config import LoggerConfig
    from decodelab.tracking import upload_run

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

"""``decodelab sweep NAME [overrides]``: a named sweep or search from sweeps/ (see decodelab/sweeps/launch.py)."""

from __future__ import annotations

import os
from typing import List

from decodelab.cli.run import cli as run_cli
from decodelab.errors import UserError
from decodelab.sweeps.callback import SWEEP_NAME_ENV
from decodelab.sweeps.launch import available, hydra_args


def cli(args: List[str]) -> None:
    names = available()
    if not args or "=" in args[0] or args[0].startswith("-"):
        raise UserError(f"sweep needs a NAME first; available: {', '.join(names)}")
    name, overrides = args[0], args[1:]
    if name not in names:
        raise UserError(f"sweep {name!r}: no sweeps/{name}.yaml; available: {', '.join(names)}")
    if "-m" in overrides or "--multirun" in overrides:
        overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    os.environ[SWEEP_NAME_ENV] = name
    try:
        run_cli(hydra_args(name, overrides))
    finally:
        os.environ.pop(SWEEP_NAME_ENV, None)

"""``decodelab sweep NAME [overrides]``: run a named sweep or search file from ``sweeps/``.

A sweep file is a Hydra config (``# @package _global_``) holding only deltas: the grid or search space
in ``hydra.sweeper.params``, fixed values, and optionally another sweeper or launcher. This command is
``decodelab run -m +sweeps=NAME`` with ``sweeps/`` on Hydra's search path, the sweep folder under
``multirun/NAME/``, and resume on: a re-run skips configs that already finished there and completes
interrupted ones from their samples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from decodelab.errors import UserError


def sweeps_dir() -> Path:
    """sweeps/ of the checkout, or DECODELAB_SWEEPS_DIR."""
    override = os.environ.get("DECODELAB_SWEEPS_DIR")
    folder = Path(override) if override else Path(__file__).resolve().parents[2] / "sweeps"
    if not folder.is_dir():
        raise UserError(f"sweeps folder not found at {folder}; set DECODELAB_SWEEPS_DIR")
    return folder


def available() -> List[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def hydra_args(name: str, overrides: List[str]) -> List[str]:
    """The ``decodelab run`` arguments of a named sweep; the user's overrides win over the defaults here."""
    folder = sweeps_dir()
    defaults = {
        "hydra.searchpath": f"[file://{folder.parent}]",
        "hydra.sweep.dir": f"multirun/{name}/${{now:%Y-%m-%d_%H-%M-%S}}_${{uid:}}",
        "resume": "true",
    }
    given = {line.split("=", 1)[0].lstrip("+~") for line in overrides}
    if folder.name != "sweeps":
        raise UserError(f"DECODELAB_SWEEPS_DIR: the folder must be named 'sweeps', got {folder}")
    return (["-m", f"+sweeps={name}"] + [f"{k}={v}" for k, v in defaults.items() if k not in given]
            + list(overrides))

"""``decodelab list``: every config group and its options, and the named sweeps."""

from __future__ import annotations

from typing import List

from decodelab.errors import UserError
from decodelab.experiment.compose import GROUPS, group_options
from decodelab.sweeps.launch import available


def cli(args: List[str]) -> None:
    if args:
        raise UserError(f"list takes no arguments, got {' '.join(args)}")
    for group in GROUPS:
        print(f"{group}: {', '.join(group_options(group))}")
    print(f"train (decodelab train-drafter train=NAME): {', '.join(group_options('train'))}")
    print(f"sweeps (decodelab sweep NAME): {', '.join(available())}")


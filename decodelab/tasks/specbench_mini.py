"""specbench-mini: our own small prompt suite in Spec-Bench's six categories.

The prompts are written for this project (not copied from Spec-Bench) and kept short so a 135M model on
CPU decodes all 30 in minutes. Summarization and RAG prompts carry context worth copying, which is where
prompt-lookup drafting helps; math, summarization and RAG carry references for quality scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from decodelab.config import TaskConfig
from decodelab.tasks.base import Prompt
from decodelab.tasks.jsonl import load_jsonl

SOURCE = "specbench_mini"
DATA_FILE = Path(__file__).resolve().parent / "data" / "specbench_mini.jsonl"
CATEGORIES = ("conversation", "translation", "summarization", "qa", "math_reasoning", "rag")


def load_specbench_mini() -> List[Prompt]:
    """Load the packaged file with the same loader users' files go through."""
    return load_jsonl(DATA_FILE, key="task.source=specbench_mini")


def load(cfg: TaskConfig) -> List[Prompt]:
    return load_specbench_mini()

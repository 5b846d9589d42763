"""Loader for Spec-Bench's question.jsonl format, the interchange format of every text task.

One JSON object per line: ``question_id``, ``category``, ``turns`` (non-empty list of str), optional
``reference``, optional ``scorer`` and optional ``context`` (the part of the first turn that is a passage or
retrieved documents, quoted exactly; context-aware decoding contrasts against it). A reference takes every shape the two benchmarks use:

- absent or null (MT-bench's open questions): no reference;
- a str;
- a list of str, one per turn (MT-bench's math and reasoning lines): the first turn's is the reference;
- a list of lists of str, the acceptable answers per turn (Spec-Bench's RAG lines): the first turn's answers,
  scored by exact match against any of them (``scorer`` defaults to ``exact`` for this shape).

Errors name the file and the 1-based line so a user can fix their own file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from decodelab.config import TaskConfig
from decodelab.errors import UserError, check
from decodelab.tasks.base import SCORERS, Prompt

# A jsonl line carries no test code, so only the reference-based scorers can be named there.
SOURCE = "jsonl"
JSONL_SCORERS = tuple(s for s in SCORERS if s != "humaneval")


def load_jsonl(path: Union[str, Path], key: str = "task.path") -> List[Prompt]:
    """Read a Spec-Bench-format file into prompts; raise UserError naming the line on bad input."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}: file not found: {file}")
    prompts: List[Prompt] = []
    seen: Dict[str, int] = {}
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{key}: {file} line {lineno}"
            prompt = _parse_line(line, where)
            if prompt.id in seen:
                raise UserError(f"{where}: duplicate question_id {prompt.id!r} (first on line {seen[prompt.id]})")
            seen[prompt.id] = lineno
            prompts.append(prompt)
    if not prompts:
        raise UserError(f"{key}: {file} holds no questions")
    return prompts


def _parse_line(line: str, where: str) -> Prompt:
    """Turn one line into a Prompt, checking each field against the format."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    qid = obj.get("question_id")
    if not isinstance(qid, (int, str)) or isinstance(qid, bool) or qid == "":
        raise UserError(f"{where}: missing or invalid 'question_id' (int or non-empty str)")
    category = obj.get("category")
    if not isinstance(category, str) or not category:
        raise UserError(f"{where}: missing or invalid 'category' (non-empty str)")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise UserError(f"{where}: missing or invalid 'turns' (non-empty list of str)")
    answers, alternatives = _answers(obj.get("reference"), where)
    reference = answers[0] if answers else None
    scorer = _scorer(obj.get("scorer", "exact" if alternatives else None), reference, where)
    context = obj.get("context")
    if context is not None and (not isinstance(context, str) or not context.strip() or context not in turns[0]):
        raise UserError(f"{where}: invalid 'context' (a non-empty str that occurs in the first turn)")
    return Prompt(id=str(qid), category=category, turns=list(turns), reference=reference, answers=answers,
                  scorer=scorer, context=context)


REFERENCE_SHAPES = "str, list of str (one per turn) or list of lists of str (acceptable answers per turn)"


def _answers(value: Any, where: str) -> Tuple[List[str], bool]:
    """The first turn's acceptable answers, and whether the line listed alternatives (a list of lists)."""
    if value is None:
        return [], False
    if isinstance(value, str):
        return [value], False
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value[:1], False
    if isinstance(value, list) and all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in value):
        first = next((v for v in value if v), [])
        return list(first), bool(first)
    raise UserError(f"{where}: invalid 'reference' ({REFERENCE_SHAPES})")


def _scorer(value: Any, reference: Optional[str], where: str) -> Optional[str]:
    """Check the scorer name and that the reference it compares against is there."""
    if value is None:
        return None
    if value not in JSONL_SCORERS:
        raise UserError(f"{where}: unknown 'scorer' {value!r}, allowed: {', '.join(JSONL_SCORERS)}")
    if reference is None:
        raise UserError(f"{where}: scorer {value!r} needs a 'reference'")
    return value


def load(cfg: TaskConfig) -> List[Prompt]:
    check(bool(cfg.path), "task.path", "task=jsonl needs task.path=<file in Spec-Bench question.jsonl format>")
    return load_jsonl(cfg.path or "")

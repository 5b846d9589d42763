"""The unit of work every task yields: one prompt, possibly multi-turn, with its reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Scorers that decodelab.experiment.quality knows; a prompt names the one that fits its reference.
SCORERS = ("rouge_l", "chrf", "math_exact", "humaneval", "exact")


@dataclass
class Prompt:
    id: str
    category: str
    turns: List[str]
    reference: Optional[str] = None
    # Every acceptable answer (Spec-Bench's RAG lines list several); the reference is the first. Exact match
    # scores against any of them.
    answers: List[str] = field(default_factory=list)
    # Which quality scorer applies (see SCORERS); None: open-ended, only distinct-n/repetition.
    scorer: Optional[str] = None
    # Extra data a scorer needs (HumanEval: "test", "entry_point", "prompt").
    meta: Dict[str, Any] = field(default_factory=dict)
    # The part of the first turn that is context (a passage to summarise, retrieved documents): what
    # context-aware decoding contrasts against; None when the prompt has none.
    context: Optional[str] = None


def without_context(text: str, context: str) -> str:
    """``text`` with ``context`` cut out (the instruction or question that remains, trimmed)."""
    return text.replace(context, "", 1).strip()

"""Output quality: cheap diversity metrics for every answer, plus the scorer its prompt names.

Speed-ups only count if quality holds, so every run scores its outputs the same way for every backend
and drafter. Scorers: ``rouge_l`` (summaries), ``math_exact`` (last number), ``exact`` (short answer
contained in the output) and ``humaneval`` (pass@1, running the problem's tests in
the OS sandbox of :mod:`decodelab.experiment.sandbox`).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from decodelab.config import TaskConfig
from decodelab.errors import check, warn
from decodelab.experiment.sandbox import ISOLATED, UNCONFINED, require_isolation, run_program
from decodelab.tasks.base import Prompt
from decodelab.tasks.metrics import chrf, rouge_l

HUMANEVAL_TIMEOUT_S = 10.0
# Scorers that execute the answer.
CODE_SCORERS = ("humaneval",)

# Numbers as written in answers: "-3", "1,234", "$1,234.50", "0.5" (a trailing "." is not part of it).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# A fenced code block; the closing fence may be missing when generation hit max_new_tokens.
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def score(prompt: Prompt, answer: str, execution: str = ISOLATED,
          humaneval_timeout: float = HUMANEVAL_TIMEOUT_S) -> Dict[str, float]:
    """All quality metrics of one answer: diversity always, plus the prompt's scorer if it has one.

    ``execution`` says how a scorer that runs the answer (HumanEval) runs it (see :mod:`.sandbox`)."""
    out = diversity(answer)
    if prompt.scorer == "rouge_l" and prompt.reference is not None:
        out["rouge_l"] = rouge_l(prompt.reference, answer)
    elif prompt.scorer == "chrf" and prompt.reference is not None:
        out["chrf"] = chrf(prompt.reference, answer)
    elif prompt.scorer == "math_exact" and prompt.reference is not None:
        out["exact_match"] = math_exact(prompt.reference, answer)
    elif prompt.scorer == "exact" and prompt.reference is not None:
        out["exact_match"] = max(contains_exact(want, answer) for want in prompt.answers or [prompt.reference])
    elif prompt.scorer == "humaneval":
        out["pass@1"] = humaneval_pass(prompt.meta, answer, execution, timeout=humaneval_timeout)
    return out


def aggregate_quality(scores: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean of each metric over the samples that have it (scorers differ between categories)."""
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for sample in scores:
        for key, value in sample.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


# --- diversity -------------------------------------------------------------------------------------


def _ngrams(tokens: Sequence[str], n: int) -> List[Tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(text: str, n: int) -> float:
    """Unique / total whitespace n-grams; low values flag degenerate, looping output."""
    grams = _ngrams(text.split(), n)
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 4) -> float:
    """Fraction of repeated n-grams (1 - unique/total); catches loops that greedy decoding falls into."""
    grams = _ngrams(text.split(), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def diversity(text: str) -> Dict[str, float]:
    return {"distinct_1": distinct_n(text, 1), "distinct_2": distinct_n(text, 2), "repetition_rate": repetition_rate(text)}


# --- reference scorers -----------------------------------------------------------------------------


def parse_number(text: str) -> Optional[float]:
    """The last number in ``text`` ("$1,234." -> 1234.0); None if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace("$", "").replace(",", ""))


def math_exact(reference: str, answer: str) -> float:
    """1.0 if the answer's last number equals the reference numerically (chain-of-thought comes first)."""
    want, got = parse_number(reference), parse_number(answer)
    if want is None or got is None:
        return 0.0
    return 1.0 if abs(want - got) <= 1e-6 * max(1.0, abs(want)) else 0.0


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def contains_exact(reference: str, answer: str) -> float:
    """1.0 if the short reference answer appears in the output (case and spacing ignored)."""
    return 1.0 if _normalize(reference) in _normalize(answer) else 0.0


# --- HumanEval -------------------------------------------------------------------------------------


def extract_code(answer: str, prompt: str, entry_point: str) -> str:
    """Program text for the answer: a fenced block if there is one, else a completion of ``prompt``.

    Chat models tend to reply with the whole function in a fence; base models continue the prompt. Code that
    defines the entry point itself is appended after the prompt, so the prompt's imports and helpers stay
    and the answer's definition wins.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
    if blocks:
        python = [b for lang, b in blocks if lang in ("", "python", "py", "python3")] or [b for _, b in blocks]
        defining = [b for b in python if f"def {entry_point}" in b]
        code = (defining or python)[0]
    else:
        code = answer
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return prompt + "\n" + code
    return prompt + code


def humaneval_pass(meta: Dict[str, str], answer: str, execution: str = ISOLATED,
                   timeout: float = HUMANEVAL_TIMEOUT_S) -> float:
    """pass@1 of one answer: 1.0 iff the problem's tests exit cleanly (in the sandbox unless ``execution`` says not)."""
    program = extract_code(answer, meta["prompt"], meta["entry_point"])
    program += "\n" + meta["test"] + f"\ncheck({meta['entry_point']})\n"
    return 1.0 if run_program(program, timeout, execution) == 0 else 0.0


def executes_code(prompts: Sequence[Prompt]) -> bool:
    """Whether scoring these prompts runs generated code."""
    return any(prompt.scorer in CODE_SCORERS for prompt in prompts)


def code_execution(task: TaskConfig, prompts: Sequence[Prompt], announce: bool = True) -> Optional[str]:
    """How this run executes generated code: ISOLATED, UNCONFINED (``task.unsafe_execution``), None if it runs none.

    Checked before the model loads (validation calls it with ``announce=False``), so a machine that cannot
    isolate code fails in a second, not after decoding.
    """
    if not executes_code(prompts):
        check(not task.unsafe_execution, "task.unsafe_execution",
              f"task={task.name} runs no generated code (HumanEval does), so there is nothing to run unconfined")
        return None
    if task.unsafe_execution:
        if announce:
            warn(f"task.unsafe_execution=true: task={task.name} runs generated code UNCONFINED (your files, processes "
                 f"and network are reachable); the run's tags and records say code_execution={UNCONFINED}")
        return UNCONFINED
    require_isolation(f"task={task.name}")
    return ISOLATED

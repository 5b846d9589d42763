"""Acceptance telemetry from per-step records (README, 'What a run records').

Steps are :class:`decodelab.decoding.types.StepRecord` (its ``from_list`` is the one reader of the list
form in ``samples.jsonl``): ``drafted`` counts the draft tokens verified (a tree's nodes), ``depth`` is the
most the step could accept (a chain's length, a tree's deepest level). alpha = accepted / drafted tokens; tau = (accepted + bonus) / verification
steps (bonus included, as vLLM reports it). Per-position acceptance is by depth: position i (the i-th
token after the root on the accepted path) was tried by every step whose draft reached depth i + 1 and
kept by those that accepted more than i tokens; for a tree, a node index would mean nothing.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

from decodelab.decoding.types import StepRecord

# A step as the engine emits it, or in its on-disk list form.
Step = Union[StepRecord, Sequence[float]]


def as_step(step: Step) -> StepRecord:
    return step if isinstance(step, StepRecord) else StepRecord.from_list(step)


def acceptance_stats(steps: Iterable[Step]) -> Dict[str, object]:
    """alpha, tau, per-position (per-depth) acceptance and the accepted-per-step histogram over ``steps``.

    ``mean_draft_length`` is drafted tokens per step (a tree's nodes: what verification pays for);
    ``mean_draft_depth`` is the longest acceptable run per step (equal for chains).
    """
    steps = [as_step(s) for s in steps]
    drafted = sum(s.drafted for s in steps)
    accepted = sum(s.accepted for s in steps)
    bonus = sum(s.bonus for s in steps)
    depths = [s.depth for s in steps]
    longest = max(depths, default=0)
    tried = [0] * longest
    kept = [0] * longest
    histogram = [0] * (longest + 1)
    for step, depth in zip(steps, depths):
        for position in range(depth):
            tried[position] += 1
            kept[position] += position < step.accepted
        histogram[step.accepted] += 1
    stats: Dict[str, object] = {
        "verify_steps": len(steps),
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "mean_accepted_length": (accepted + bonus) / len(steps) if steps else 0.0,
        "mean_draft_length": drafted / len(steps) if steps else 0.0,
        "mean_draft_depth": sum(depths) / len(steps) if steps else 0.0,
        "draft_s": sum(s.draft_s for s in steps),
        "verify_s": sum(s.verify_s for s in steps),
        "accepted_histogram": histogram,
        "per_position_acceptance": [k / t if t else 0.0 for k, t in zip(kept, tried)],
    }
    if drafted:
        stats["acceptance_rate"] = accepted / drafted
    return stats


def expected_tokens_per_step(alpha: float, k: float) -> float:
    """Leviathan et al.: E[tokens per step] = (1 - alpha^(k+1)) / (1 - alpha), i.i.d. acceptance alpha."""
    if alpha >= 1.0:
        return k + 1
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, k: float, draft_cost: float, verify_cost: float = 1.0) -> float:
    """Predicted speedup over AR: expected tokens per step over the step's cost in AR-token units.

    ``draft_cost``: drafting time per step / one AR step; ``verify_cost``: one target forward over
    k + 1 tokens / one AR step (1 in Leviathan et al.'s model; measured, it grows with k on a CPU).
    """
    return expected_tokens_per_step(alpha, k) / (draft_cost + verify_cost)


def cost_model(stats: Dict[str, object], draft_forwards: int, ar_step_s: Optional[float]) -> Dict[str, float]:
    """Draft/target cost ratio and predicted speedups, given the AR per-token time of the baseline."""
    steps = int(stats["verify_steps"])  # type: ignore[arg-type]
    if not steps or not ar_step_s or "acceptance_rate" not in stats:
        return {}
    if not stats["draft_s"] and not stats["verify_s"]:
        return {}  # an engine that does not time its steps (vllm): no cost to model
    alpha = float(stats["acceptance_rate"])  # type: ignore[arg-type]
    # The formula's k caps the tokens a step can accept: a tree's depth, not its node count (same for chains).
    k = float(stats.get("mean_draft_depth", stats["mean_draft_length"]))  # type: ignore[arg-type]
    draft_cost = float(stats["draft_s"]) / steps / ar_step_s  # type: ignore[arg-type]
    verify_cost = float(stats["verify_s"]) / steps / ar_step_s  # type: ignore[arg-type]
    out = {
        "draft_cost_per_step": draft_cost,
        "verify_cost_per_step": verify_cost,
        "predicted_speedup": predicted_speedup(alpha, k, draft_cost, verify_cost),
        "predicted_speedup_ideal_verify": predicted_speedup(alpha, k, draft_cost, 1.0),
    }
    if draft_forwards:
        out["draft_target_cost_ratio"] = float(stats["draft_s"]) / draft_forwards / ar_step_s  # type: ignore[arg-type]
    return out


def curve_cost(curve: Dict[int, float], tokens: float) -> float:
    """A forward over ``tokens`` tokens, in one-token forwards: ``curve`` (token count -> cost ratio, measured
    apart, e.g. by benchmarks/verify_latency.py) interpolated linearly, extrapolated past its last point."""
    points = sorted((int(n), float(c)) for n, c in curve.items())
    if not points:
        raise ValueError("empty latency curve")
    if len(points) == 1 or tokens <= points[0][0]:
        return points[0][1]
    for (n0, c0), (n1, c1) in zip(points, points[1:]):
        if tokens <= n1:
            return c0 + (c1 - c0) * (tokens - n0) / (n1 - n0)
    (n0, c0), (n1, c1) = points[-2], points[-1]
    return c1 + (c1 - c0) * (tokens - n1) / (n1 - n0)


def curve_predicted_speedup(steps: Iterable[Step], curve: Dict[int, float], forward_s: float) -> Optional[float]:
    """Predicted speedup over AR from the recorded acceptance and a forward-latency curve measured apart.

    Unlike :func:`predicted_speedup` it assumes no acceptance model: the tokens each step yielded are the run's
    own (the empirical accepted-length distribution, which keeps the bursts of n-gram drafts that an i.i.d.
    alpha smooths away). Each step costs its recorded draft time over ``forward_s`` (one one-token forward,
    from the same curve measurement) plus the curve's cost of verifying its drafted tokens and the root; an AR
    step costs one one-token forward. None without steps.
    """
    steps = [as_step(s) for s in steps]
    if not steps:
        return None
    tokens = sum(s.accepted + s.bonus for s in steps)
    cost = sum(s.draft_s / forward_s + curve_cost(curve, s.drafted + 1) for s in steps)
    return tokens / cost


def flat_metrics(stats: Dict[str, object]) -> Dict[str, float]:
    """The scalar entries (what MLflow takes as metrics), with per-position rates as pos_<i>."""
    out = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    for position, rate in enumerate(stats.get("per_position_acceptance", []) or []):  # type: ignore[union-attr]
        out[f"acceptance_rate_pos_{position}"] = float(rate)
    return out


def merge_steps(samples: Iterable[dict]) -> List[StepRecord]:
    """Every step of the recorded ``samples`` (run records with a ``steps`` list), typed."""
    return [StepRecord.from_list(step) for sample in samples for step in sample.get("steps", [])]

"""Metric definitions (README, 'What a run records'), one for every backend.

A sample may have several turns; its new tokens and wall time are sums over turns, its TTFT the mean
of the turns' TTFTs, and its TPOT the decode time after each turn's first token over the tokens after it.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import mean
from typing import Dict, Iterable, List, Sequence

from decodelab.experiment.stats import bootstrap_speedup
from decodelab.decoding.types import Generation
from decodelab.experiment.telemetry import acceptance_stats, cost_model, flat_metrics, merge_steps

HEADLINE = ("throughput_tok_s", "mean_sample_tok_s", "ttft_s", "tpot_s", "new_tokens", "peak_mem_mb")


def sample_timing(turns: Sequence[Generation]) -> Dict[str, float]:
    new_tokens = sum(len(g.tokens) for g in turns)
    wall = sum(g.wall_s for g in turns)
    ttft_total = sum(g.ttft_s for g in turns)
    after_first = new_tokens - len(turns)
    return {
        "new_tokens": new_tokens,
        "wall_s": wall,
        "ttft_s": ttft_total / len(turns),
        "tpot_s": (wall - ttft_total) / after_first if after_first > 0 else 0.0,
        "tok_s": new_tokens / wall if wall > 0 else 0.0,
        "target_forwards": sum(g.target_forwards for g in turns),
        "draft_forwards": sum(g.draft_forwards for g in turns),
        "aux_forwards": sum(g.aux_forwards for g in turns),
    }


def summarize(samples: Iterable[dict]) -> Dict[str, float]:
    """Headline figures overall and per category (suffixed ``/<category>``), plus mean quality scores."""
    samples = list(samples)
    summary: Dict[str, float] = {"num_samples": len(samples)}
    summary.update(_aggregate(samples))
    by_category: Dict[str, List[dict]] = defaultdict(list)
    for sample in samples:
        by_category[sample["category"]].append(sample)
    for category, group in sorted(by_category.items()):
        for key, value in _aggregate(group).items():
            summary[f"{key}/{category}"] = value
        summary[f"num_samples/{category}"] = len(group)
    summary.update(_batched(samples))
    return summary


def _batched(samples: List[dict]) -> Dict[str, float]:
    """Throughput of requests decoded together: all new tokens over the batches' engine time (each batch
    counted once). Overall only, since a batch mixes categories; equal to throughput_tok_s, up to the
    engine's own overhead, when requests go one at a time."""
    if not samples or not all("batch_engine_s" in s for s in samples):
        return {}
    seconds = {(bool(s.get("resumed")), s["batch"]): s["batch_engine_s"] for s in samples}
    total = sum(seconds.values())
    return {"batch_throughput_tok_s": sum(s["new_tokens"] for s in samples) / total if total > 0 else 0.0,
            "mean_batch_size": mean(s["batch_size"] for s in samples)}


def _aggregate(samples: List[dict]) -> Dict[str, float]:
    if not samples:
        return {}
    wall = sum(s["wall_s"] for s in samples)
    new_tokens = sum(s["new_tokens"] for s in samples)
    out = {
        "throughput_tok_s": new_tokens / wall if wall > 0 else 0.0,
        "mean_sample_tok_s": mean(s["tok_s"] for s in samples),
        "ttft_s": mean(s["ttft_s"] for s in samples),
        "tpot_s": mean(s["tpot_s"] for s in samples),
        "new_tokens": new_tokens,
        "wall_s": wall,
        "peak_mem_mb": max(s["peak_mem_mb"] for s in samples),
        "target_forwards": sum(s["target_forwards"] for s in samples),
        # Cost beside speed: forwards of the target (and of a contrast's second model or pass) per new token.
        "target_forwards_per_token": sum(s["target_forwards"] for s in samples) / max(new_tokens, 1),
    }
    aux = sum(s.get("aux_forwards", 0) for s in samples)
    if aux:
        out["aux_forwards_per_token"] = aux / max(new_tokens, 1)
    quality: Dict[str, List[float]] = defaultdict(list)
    for s in samples:
        for key, value in s.get("quality", {}).items():
            quality[key].append(value)
    out.update({key: mean(values) for key, values in quality.items()})
    out.update(_speculative(samples))
    return out


def _speculative(samples: List[dict]) -> Dict[str, float]:
    """Acceptance, losslessness and speedup figures; empty for plain AR runs without a baseline."""
    with_baseline = [s for s in samples if s.get("baseline")]
    stats = acceptance_stats(merge_steps(samples))
    if not stats["drafted_tokens"] and not with_baseline:
        return {}
    out: Dict[str, float] = flat_metrics(stats)
    out["draft_forwards"] = sum(s.get("draft_forwards", 0) for s in samples)
    checked = [s["lossless"] for s in samples if s.get("lossless") is not None]
    if checked:
        out["lossless_rate"] = sum(checked) / len(checked)
    if any(s.get("lossy") for s in samples):
        out["lossy"] = 1.0
    if with_baseline:
        base = [s["baseline"] for s in with_baseline]
        out.update(bootstrap_speedup([(s["new_tokens"], s["wall_s"], b["new_tokens"], b["wall_s"])
                                      for s, b in zip(with_baseline, base)]))
        # Timings of a cached baseline were taken in an earlier run: say so beside the speedup.
        out["baseline_cached_fraction"] = sum(bool(b.get("cached")) for b in base) / len(base)
        out["baseline_throughput_tok_s"] = sum(b["new_tokens"] for b in base) / max(sum(b["wall_s"] for b in base), 1e-12)
        decode_tokens = sum(b["new_tokens"] - b["turns"] for b in base)
        ar_step_s = sum(b["wall_s"] - b["ttft_s_total"] for b in base) / decode_tokens if decode_tokens > 0 else None
        out.update(cost_model(stats, int(out["draft_forwards"]), ar_step_s))
    return out


def list_metrics(samples: Iterable[dict]) -> Dict[str, list]:
    """Non-scalar figures for summary.json and plots: accepted-per-step histogram, per-position acceptance."""
    stats = acceptance_stats(merge_steps(samples))
    return {"accepted_histogram": stats["accepted_histogram"],
            "per_position_acceptance": stats["per_position_acceptance"]}

"""The autoregressive baseline of a speculative run: losslessness and speedup are measured against it.

For every prompt (and turn) of a run with a drafter, the same model decodes the same input ids with
drafter=none. The result (tokens and timings) is cached on disk per model, dtype, device, strategy,
stop rules and max_new_tokens, so a second run of the same config reuses it. Computing it right before
the speculative decode of the same prompt alternates the two, so drift in machine load hits both.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.drafters.none import NoDrafter
from decodelab.config import DrafterConfig
from decodelab.decoding.engine import StopCriteria, decode
from decodelab.decoding.logits import LogitsPipeline


@dataclass
class Reference:
    tokens: List[int]
    wall_s: float
    ttft_s: float
    cached: bool = False


class ARReference:
    def __init__(self, target: LMAdapter, pipeline: LogitsPipeline, stop: StopCriteria, cache_dir: str,
                 key_parts: Dict[str, object], use_cache: bool = True):
        self.target = target
        self.pipeline = pipeline
        self.stop = stop
        self.drafter = NoDrafter(DrafterConfig())
        digest = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = Path(os.path.expanduser(cache_dir)) / "ar_reference" / f"{digest}.jsonl"
        self.use_cache = use_cache
        self.entries: Dict[str, Reference] = self._load() if use_cache else {}

    def _load(self) -> Dict[str, Reference]:
        entries: Dict[str, Reference] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    entries[row["key"]] = Reference(row["tokens"], row["wall_s"], row["ttft_s"], cached=True)
                except (ValueError, KeyError):
                    continue  # a torn last line after a crash: recompute that entry
        return entries

    def get(self, prompt_ids: Sequence[int], seed: int) -> Reference:
        key = hashlib.sha256(json.dumps([list(prompt_ids), seed]).encode()).hexdigest()
        if key not in self.entries:
            self.target.reset()
            generation = decode(self.target, prompt_ids, pipeline=self.pipeline, drafter=self.drafter,
                                stop=self.stop, generator=_generator(self.target.device, seed))
            reference = Reference(generation.tokens, generation.wall_s, generation.ttft_s)
            self.entries[key] = reference
            if not self.use_cache:
                return reference
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"key": key, **asdict(reference), "cached": None}) + "\n")
        return self.entries[key]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def divergence(target: LMAdapter, prompt_ids: Sequence[int], reference: Sequence[int],
               produced: Sequence[int]) -> Optional[Dict[str, float]]:
    """First index where ``produced`` leaves ``reference`` and the target's top-2 logit margin there.

    A margin near zero points at a tie broken differently in low precision; a large one at a bug.
    """
    index = next((i for i, (a, b) in enumerate(zip(reference, produced)) if a != b), None)
    if index is None:
        if len(reference) == len(produced):
            return None
        index = min(len(reference), len(produced))
    target.reset()
    logits = target.prefill(list(prompt_ids) + list(reference[:index]))
    top = torch.topk(logits.float(), 2).values
    return {"index": index, "top2_margin": float(top[0] - top[1])}


def bootstrap_speedup(pairs: Sequence[Sequence[float]], rounds: int = 1000, seed: int = 0) -> Dict[str, float]:
    """Ratio of throughputs (spec / baseline) with a bootstrap 95% interval over samples.

    ``pairs``: per sample (spec_tokens, spec_wall_s, base_tokens, base_wall_s).
    """
    def ratio(rows: Sequence[Sequence[float]]) -> float:
        spec = sum(r[0] for r in rows) / max(sum(r[1] for r in rows), 1e-12)
        base = sum(r[2] for r in rows) / max(sum(r[3] for r in rows), 1e-12)
        return spec / base if base > 0 else 0.0

    if not pairs:
        return {}
    rng = random.Random(seed)
    draws = sorted(ratio([pairs[rng.randrange(len(pairs))] for _ in pairs]) for _ in range(rounds))
    return {"speedup": ratio(pairs), "speedup_ci_low": draws[int(0.025 * rounds)],
            "speedup_ci_high": draws[min(rounds - 1, int(0.975 * rounds))]}

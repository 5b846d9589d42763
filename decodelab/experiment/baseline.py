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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from decodelab.decoding.lm import LMAdapter
from decodelab.drafters.none import NoDrafter
from decodelab.config import DrafterConfig
from decodelab.decoding.engine import decode
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.logits import LogitsPipeline


@dataclass
class Baseline:
    tokens: List[int]
    wall_s: float
    ttft_s: float
    cached: bool = False


class BaselineCache:
    def __init__(self, target: LMAdapter, pipeline: LogitsPipeline, stop: StopCriteria, cache_dir: str,
                 key_parts: Dict[str, object], use_cache: bool = True, generate: Callable = decode):
        # ``generate``: the run's strategy without its drafter (an MBR baseline draws all its samples).
        self.generate = generate
        self.target = target
        self.pipeline = pipeline
        self.stop = stop
        self.drafter = NoDrafter(DrafterConfig())
        digest = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = Path(os.path.expanduser(cache_dir)) / "ar_baseline" / f"{digest}.jsonl"
        self.use_cache = use_cache
        self.entries: Dict[str, Baseline] = self._load() if use_cache else {}

    def _load(self) -> Dict[str, Baseline]:
        entries: Dict[str, Baseline] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    entries[row["key"]] = Baseline(row["tokens"], row["wall_s"], row["ttft_s"], cached=True)
                except (ValueError, KeyError):
                    continue  # a torn last line after a crash: recompute that entry
        return entries

    def get(self, prompt_ids: Sequence[int], seed: int) -> Baseline:
        key = hashlib.sha256(json.dumps([list(prompt_ids), seed]).encode()).hexdigest()
        if key not in self.entries:
            self.target.reset()
            generation = self.generate(self.target, prompt_ids, pipeline=self.pipeline, drafter=self.drafter,
                                       stop=self.stop, generator=_generator(self.target.device, seed))
            baseline = Baseline(generation.tokens, generation.wall_s, generation.ttft_s)
            self.entries[key] = baseline
            if not self.use_cache:
                return baseline
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"key": key, **asdict(baseline), "cached": None}) + "\n")
        return self.entries[key]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def divergence(target: LMAdapter, prompt_ids: Sequence[int], baseline: Sequence[int],
               produced: Sequence[int]) -> Optional[Dict[str, float]]:
    """First index where ``produced`` leaves ``baseline`` and the target's top-2 logit margin there.

    A margin near zero points at a tie broken differently in low precision; a large one at a bug.
    """
    index = next((i for i, (a, b) in enumerate(zip(baseline, produced)) if a != b), None)
    if index is None:
        if len(baseline) == len(produced):
            return None
        index = min(len(baseline), len(produced))
    target.reset()
    logits = target.prefill(list(prompt_ids) + list(baseline[:index]))
    top = torch.topk(logits.float(), 2).values
    return {"index": index, "top2_margin": float(top[0] - top[1])}


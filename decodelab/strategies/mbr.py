"""Minimum Bayes risk decoding (sampling-based MBR, Eikema & Aziz 2020; Freitag et al. 2022).

Draw ``num_samples`` candidates from the model, then answer with the candidate of highest mean utility against
the others: the other samples stand in for the model's distribution over answers, so the choice is the model's
"consensus" answer rather than its single most probable (or luckiest) one. Ties go to the earliest candidate.

Candidates are drawn by the engine's ``decode`` with the run's drafter: lossless speculative sampling keeps each
candidate's distribution, so a drafter makes MBR cheaper without changing what it estimates (not the same draws,
though). One generator is advanced through all candidates, so a seed fixes the whole set.

Utilities: ``rouge_l`` and ``chrf`` compare decoded texts (chrF through sacrebleu); ``embedding`` is the cosine of
the candidates' mean-pooled final hidden states under the target, one extra prefill of prompt + candidate each.
Only ``embedding`` reads hidden states, so only it asks for a capturing target (``hidden_states`` is set per
instance, which the runner reads after building the strategy): the text utilities keep the compiled static path
and run on every model and cache.

Costs in the returned Generation are the whole of MBR: wall time, target and draft forwards (the embedding
prefills included) and the steps of every candidate; ``ttft_s`` is the sum of the candidates' TTFTs, so TPOT
is the decode time of every sample per token answered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Sequence, TypeVar

import torch

from decodelab.config import BackendConfig, StrategyConfig
from decodelab.decoding.engine import decode
from decodelab.decoding.lm import LMAdapter, synchronize
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Generation, Proposer
from decodelab.errors import check
from decodelab.strategies.base import Strategy
from decodelab.tasks.metrics import chrf, rouge_l

UTILITIES = ("rouge_l", "chrf", "embedding")
T = TypeVar("T")


@dataclass
class MbrConfig(StrategyConfig):
    name: str = "mbr"
    # Sampled candidates; each is also a pseudo-reference for the others.
    num_samples: int = 8
    # rouge_l | chrf | embedding (see the module docstring).
    utility: str = "rouge_l"
    do_sample: bool = True

    def validate(self, key: str = "strategy") -> None:
        super().validate(key)
        check(self.num_samples >= 2, f"{key}.num_samples",
              f"must be >= 2 (each candidate is scored against the others), got {self.num_samples}")
        check(self.utility in UTILITIES, f"{key}.utility", f"got {self.utility!r}, allowed: {', '.join(UTILITIES)}")
        check(self.do_sample, f"{key}.do_sample",
              "MBR needs sampled candidates (greedy ones would all be equal); use do_sample=true")


def expected_utilities(candidates: Sequence[T], utility: Callable[[T, T], float]) -> List[float]:
    """Mean ``utility(hypothesis, reference)`` of each candidate against every other candidate."""
    n = len(candidates)
    if n < 2:
        return [0.0] * n
    return [sum(utility(h, r) for j, r in enumerate(candidates) if j != i) / (n - 1)
            for i, h in enumerate(candidates)]


def select(candidates: Sequence[T], utility: Callable[[T, T], float]) -> int:
    """Index of the candidate with the highest mean utility against the others; ties: the earliest."""
    means = expected_utilities(candidates, utility)
    return max(range(len(means)), key=lambda i: (means[i], -i))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


class Mbr(Strategy):
    names = ("mbr",)
    config_class = MbrConfig

    def __init__(self, cfg: MbrConfig, *, loaded=None, backend: BackendConfig | None = None):
        super().__init__(cfg, loaded=loaded, backend=backend)
        self.tokenizer = loaded.tokenizer if loaded is not None else None
        self.hidden_states = cfg.utility == "embedding"
        self.utility = self._utility(cfg.utility)

    @staticmethod
    def _utility(name: str) -> Callable:
        if name == "rouge_l":
            return lambda hypothesis, reference: rouge_l(reference, hypothesis)
        if name == "chrf":
            return lambda hypothesis, reference: chrf(reference, hypothesis)
        return cosine

    def prepare(self, slots: int) -> float:
        """Before anything is timed: the first call of a text utility imports its library (rouge_score pulls in
        nltk: seconds), which must not land in the first sample's wall time."""
        if self.tokenizer is not None and self.cfg.utility != "embedding":  # type: ignore[attr-defined]
            self.utility("warm up", "warm up")
        return 0.0

    def generate(self, target: LMAdapter, prompt_ids: Sequence[int], *, pipeline: LogitsPipeline,
                 drafter: Proposer, stop: StopCriteria, generator: torch.Generator) -> Generation:
        cfg: MbrConfig = self.cfg  # type: ignore[assignment]
        prompt = list(prompt_ids)
        forwards_before = target.forwards
        synchronize(target.device)
        start = time.perf_counter()
        samples: List[Generation] = []
        for _ in range(cfg.num_samples):
            target.reset()
            samples.append(decode(target, prompt, pipeline=pipeline, drafter=drafter, stop=stop, generator=generator))
        if cfg.utility == "embedding":
            points = [self._embedding(target, prompt, g.tokens) for g in samples]
        else:
            if self.tokenizer is None:
                raise RuntimeError(f"utility={cfg.utility} compares texts: build Mbr with loaded=<a LoadedModel>")
            points = [self.tokenizer.decode(g.tokens, skip_special_tokens=True) for g in samples]
        best = samples[select(points, self.utility)]
        synchronize(target.device)
        return Generation(tokens=best.tokens, stop_reason=best.stop_reason, ttft_s=sum(g.ttft_s for g in samples),
                          wall_s=time.perf_counter() - start, steps=[s for g in samples for s in g.steps],
                          target_forwards=target.forwards - forwards_before,
                          draft_forwards=sum(g.draft_forwards for g in samples),
                          aux_forwards=sum(g.aux_forwards for g in samples), lossy=any(g.lossy for g in samples))

    @staticmethod
    @torch.inference_mode()
    def _embedding(target: LMAdapter, prompt: List[int], tokens: List[int]) -> torch.Tensor:
        """Mean of the final hidden states (after the final norm) over the candidate's positions."""
        target.reset()
        target.prefill(prompt + tokens)
        stream = target.hidden_states
        if not stream:
            raise RuntimeError("utility=embedding reads hidden states: build the target with "
                               "LMAdapter(hidden_states=True)")
        return target.model.model.norm(stream[-1][-len(tokens):]).float().mean(dim=0)

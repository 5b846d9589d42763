"""Beam search and diverse (group) beam search (Vijayakumar et al.), on one batched forward of all beams per step.

Plain beam search follows ``transformers.generate(num_beams=k, do_sample=False)`` step for step, so the two agree
token for token (tests/strategies/test_beam.py checks it on SmolLM2):
- each step keeps the best ``max(2, 1 + #eos) * beams`` continuations by accumulated log-probability, so that
  beams which just finished leave enough open ones to go on;
- a continuation that hits a stop criterion (EOS, a stop string, the token budget) among the first ``beams`` of
  them becomes a finished hypothesis, scored ``logprob / generated_length ** length_penalty``; the best
  ``beams`` finished ones are kept;
- ``early_stopping``: true stops when ``beams`` hypotheses are finished; false stops once the best open beam,
  at its current length, cannot beat the worst finished one; never does the same at the longest length when
  the length penalty rewards length.

With ``num_beam_groups`` G the beams form G groups of ``num_beams / G``, each a beam search of its own. Groups
choose in turn at each step, and group g's log-probabilities lose ``diversity_penalty`` times the number of
earlier groups' beams that chose the same token at this step (Hamming diversity). The penalised scores are the
beam scores, as in the paper. The answer is the best finished hypothesis over all groups.

Processors work on log-probabilities, as in transformers' beam search: the repetition penalty
(``strategy.repetition_penalty``) and ``no_repeat_ngram_size`` (no n-gram of prompt + output occurs twice).
The forward is the model's own (transformers' DynamicCache, reordered by beam each step). A drafter cannot run
with it: a beam step scores whole candidate sets, not one sequence that a draft could extend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Set, Tuple

import torch
from transformers import DynamicCache

from decodelab.config import StrategyConfig
from decodelab.decoding.lm import CACHE_KWARG, synchronize
from decodelab.decoding.logits import LogitsPipeline, apply_repetition_penalty, seen_mask
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Generation, Proposer
from decodelab.errors import check
from decodelab.strategies.base import Strategy

EARLY_STOPPING = ("false", "true", "never")
# A score no real hypothesis reaches: marks slots that must not be chosen (as transformers does).
EXCLUDED = -1.0e9


@dataclass
class BeamConfig(StrategyConfig):
    name: str = "beam"
    num_beams: int = 4
    length_penalty: float = 1.0
    # false | true | never (transformers' early_stopping; see the module docstring).
    early_stopping: str = "false"
    no_repeat_ngram_size: int = 0
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0

    def validate(self, key: str = "strategy") -> None:
        super().validate(key)
        check(self.num_beams >= 1, f"{key}.num_beams", f"must be >= 1, got {self.num_beams}")
        check(self.early_stopping.lower() in EARLY_STOPPING, f"{key}.early_stopping",
              f"got {self.early_stopping!r}, allowed: {', '.join(EARLY_STOPPING)}")
        check(self.no_repeat_ngram_size >= 0, f"{key}.no_repeat_ngram_size",
              f"must be >= 0 (0 disables), got {self.no_repeat_ngram_size}")
        check(self.num_beam_groups >= 1, f"{key}.num_beam_groups", f"must be >= 1, got {self.num_beam_groups}")
        check(self.num_beams % self.num_beam_groups == 0, f"{key}.num_beams",
              f"must be divisible by strategy.num_beam_groups={self.num_beam_groups}, got {self.num_beams}")
        check(self.diversity_penalty >= 0, f"{key}.diversity_penalty", f"must be >= 0, got {self.diversity_penalty}")
        check(self.diversity_penalty == 0 or self.num_beam_groups > 1, f"{key}.diversity_penalty",
              f"needs strategy.num_beam_groups > 1 (diversity is between groups), got {self.diversity_penalty} "
              "with one group")
        check(not self.do_sample, f"{key}.do_sample",
              "beam search here is deterministic (beam sampling is not implemented); use do_sample=false")


@dataclass
class Group:
    """One group's open beams (token lists after the prompt, scores sorted best first) and finished ones."""

    size: int
    beams: List[List[int]]
    scores: torch.Tensor
    finished: List[Tuple[float, List[int]]]
    improvable: bool = True
    alive: bool = True


class BeamSearch(Strategy):
    names = ("beam", "diverse_beam")
    config_class = BeamConfig
    drafter_conflict = "a beam step ranks many candidate sequences, so there is no single sequence to draft for"

    def generate(self, target, prompt_ids: Sequence[int], *, pipeline: LogitsPipeline, drafter: Proposer,
                 stop: StopCriteria, generator: torch.Generator) -> Generation:
        cfg: BeamConfig = self.cfg  # type: ignore[assignment]
        model = target.model
        device = target.device
        prompt = list(prompt_ids)
        beams = cfg.num_beams
        size = beams // cfg.num_beam_groups
        keep = max(2, 1 + len(stop.eos_ids)) * size
        synchronize(device)
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        logits = _forward(model, cache, torch.tensor([prompt] * beams, device=device), len(prompt))
        forwards, ttft = 1, None
        groups = [Group(size, [[] for _ in range(size)], _initial_scores(size), []) for _ in range(cfg.num_beam_groups)]
        while True:
            log_probs = self._processed(logits, prompt, [b for g in groups for b in g.beams])
            chosen: Dict[int, int] = {}  # token -> how many earlier groups' beams took it at this step
            sources: List[int] = []
            for index, group in enumerate(groups):
                rows = log_probs[index * size:(index + 1) * size]
                if cfg.diversity_penalty and chosen:
                    penalty = torch.zeros(rows.size(-1))
                    penalty[list(chosen)] = torch.tensor(list(chosen.values()), dtype=torch.float32)
                    rows = rows - cfg.diversity_penalty * penalty.to(rows.device)
                picked = self._step(group, rows, keep, stop, cfg)
                for beam in group.beams:
                    chosen[beam[-1]] = chosen.get(beam[-1], 0) + 1
                sources += [index * size + beam for beam in picked]
            if ttft is None:
                synchronize(device)
                ttft = time.perf_counter() - start
            if not any(g.alive for g in groups):
                break
            cache.reorder_cache(torch.tensor(sources, device=device))
            last = torch.tensor([[b[-1]] for g in groups for b in g.beams], device=device)
            logits = _forward(model, cache, last, len(prompt) + len(groups[0].beams[0]))
            forwards += 1
        self.groups = groups  # the last search's groups, for inspection
        best = max((h for g in groups for h in g.finished), key=lambda h: h[0])
        tokens = best[1]
        ended = stop.check(tokens, 1) if tokens else None
        reason = ended[1] if ended else "max_new_tokens"
        synchronize(device)
        return Generation(tokens=tokens, stop_reason=reason, ttft_s=ttft or 0.0, wall_s=time.perf_counter() - start,
                          target_forwards=forwards)

    def _processed(self, logits: torch.Tensor, prompt: List[int], beams: List[List[int]]) -> torch.Tensor:
        """Log-probabilities [beams, vocab] after the repetition penalty and the n-gram ban (on log-probs, as
        transformers' beam search applies its processors)."""
        cfg: BeamConfig = self.cfg  # type: ignore[assignment]
        log_probs = torch.log_softmax(logits, dim=-1)
        if cfg.repetition_penalty != 1.0:
            context = [torch.tensor(prompt + b, dtype=torch.long) for b in beams]
            seen = seen_mask(context, log_probs.size(0), log_probs.size(1), log_probs.device)
            log_probs = apply_repetition_penalty(log_probs, seen, cfg.repetition_penalty)
        if cfg.no_repeat_ngram_size > 0:
            for row, beam in enumerate(beams):
                banned = banned_ngram_tokens(prompt + beam, cfg.no_repeat_ngram_size)
                if banned:
                    log_probs[row, list(banned)] = float("-inf")
        return log_probs

    def _step(self, group: Group, log_probs: torch.Tensor, keep: int, stop: StopCriteria,
              cfg: BeamConfig) -> List[int]:
        """Advance one group a token: new open beams (in place) and the indices of the beams they extend."""
        vocab = log_probs.size(-1)
        total = (log_probs + group.scores[:, None].to(log_probs.device)).reshape(-1).float().cpu()
        top_scores, top_index = torch.topk(total, k=keep)
        candidates = [(int(i) // vocab, int(i) % vocab) for i in top_index]
        hits = torch.tensor([stop.check(group.beams[b] + [t], 1) is not None for b, t in candidates])
        length = len(group.beams[0]) + 1
        if group.alive:
            self._finish(group, top_scores, candidates, hits, length, cfg)
        open_scores = top_scores + hits.float() * EXCLUDED
        order = torch.topk(open_scores, k=group.size).indices.tolist()
        sources = [candidates[i][0] for i in order]
        group.beams = [group.beams[candidates[i][0]] + [candidates[i][1]] for i in order]
        group.scores = open_scores[order]
        if group.alive:
            group.improvable = group.improvable and self._improvable(group, length, stop, cfg)
            full = len(group.finished) == group.size
            group.alive = group.improvable and not (full and cfg.early_stopping.lower() == "true") \
                and not bool(hits.all())
        return sources

    @staticmethod
    def _finish(group: Group, scores: torch.Tensor, candidates: List[Tuple[int, int]], hits: torch.Tensor,
                length: int, cfg: BeamConfig) -> None:
        """Candidates among the first ``group.size`` that hit a stop criterion become finished hypotheses."""
        if not group.improvable or (len(group.finished) == group.size and cfg.early_stopping.lower() == "true"):
            return
        for rank in range(group.size):
            if hits[rank]:
                beam, token = candidates[rank]
                group.finished.append((float(scores[rank]) / length ** cfg.length_penalty, group.beams[beam] + [token]))
        group.finished.sort(key=lambda h: -h[0])
        del group.finished[group.size:]

    @staticmethod
    def _improvable(group: Group, length: int, stop: StopCriteria, cfg: BeamConfig) -> bool:
        """Whether the best open beam may still beat the worst finished hypothesis (transformers' heuristic)."""
        if len(group.finished) < group.size:
            return True
        hypothetical = stop.max_new_tokens if cfg.early_stopping.lower() == "never" and cfg.length_penalty > 0 \
            else length
        best_possible = float(group.scores[0]) / hypothetical ** cfg.length_penalty
        return best_possible > group.finished[-1][0]


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> Set[int]:
    """Tokens that would repeat an n-gram of ``tokens`` if appended (transformers' no_repeat_ngram_size)."""
    if len(tokens) + 1 < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}


def _initial_scores(size: int) -> torch.Tensor:
    """Only the first beam is open at the start, so the beams do not all pick the same first token."""
    scores = torch.full((size,), EXCLUDED)
    scores[0] = 0.0
    return scores


@torch.inference_mode()
def _forward(model, cache: DynamicCache, input_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Float32 next-token logits [beams, vocab] of ``input_ids`` [beams, T], the last T of ``length`` positions,
    called the way ``generate`` calls the model (an all-ones mask over ``length``, one logit row kept)."""
    mask = torch.ones(input_ids.size(0), length, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
    return out.logits[:, -1, :].float()

"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

Each step takes the ``top_k`` most probable next tokens (softmax of the run's processed logits, so a repetition
penalty applies) and picks the one maximising

    (1 - penalty_alpha) * p(v) - penalty_alpha * max_j cos(h_v, h_j)

where h_v is the candidate's final hidden state (after the final norm) and h_j are those of the context (prompt
and generated tokens): the degeneration penalty keeps the model confident while steering it away from
representations it already produced, which is what makes greedy text repeat itself. ``penalty_alpha=0`` is
greedy decoding, token for token.

The k candidates run in one forward as k siblings at the same position (``LMAdapter.forward_level``), which
gives both their hidden states and their next-token logits; the chosen one is kept in the cache and its row is
the next step's distribution. Unlike the engine's loop the cache holds every committed token. Hidden states are
read from the static forward's residual stream, so this runs on the llama/qwen2 families. A drafter cannot run
with it: the chosen token depends on hidden states of tokens that were never proposed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Sequence

import torch

from decodelab.config import StrategyConfig
from decodelab.decoding.lm import LMAdapter, synchronize
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Generation, Proposer
from decodelab.errors import check
from decodelab.strategies.base import Strategy


@dataclass
class ContrastiveSearchConfig(StrategyConfig):
    name: str = "contrastive_search"
    # The weight of the degeneration penalty; 0 is greedy decoding.
    penalty_alpha: float = 0.6
    # The candidate count (the paper's k); the logits pipeline's top-k filter is off in greedy mode.
    top_k: int = 4

    def validate(self, key: str = "strategy") -> None:
        super().validate(key)
        check(0 <= self.penalty_alpha <= 1, f"{key}.penalty_alpha", f"must be in [0, 1], got {self.penalty_alpha}")
        check(self.top_k >= 1, f"{key}.top_k",
              f"is the candidate count of contrastive search and must be >= 1, got {self.top_k}")
        check(not self.do_sample, f"{key}.do_sample",
              "contrastive search is deterministic (it ranks the top-k candidates); use do_sample=false")


class ContrastiveSearch(Strategy):
    names = ("contrastive_search",)
    config_class = ContrastiveSearchConfig
    drafter_conflict = "each step scores top_k candidates by their hidden states, so there is no draft to verify"
    hidden_states = True

    def generate(self, target: LMAdapter, prompt_ids: Sequence[int], *, pipeline: LogitsPipeline,
                 drafter: Proposer, stop: StopCriteria, generator: torch.Generator) -> Generation:
        cfg: ContrastiveSearchConfig = self.cfg  # type: ignore[assignment]
        prompt = list(prompt_ids)
        alpha = float(cfg.penalty_alpha)
        forwards_before = target.forwards
        synchronize(target.device)
        start = time.perf_counter()
        target.reset()  # the prefill must run (and so give the hidden states of) the whole prompt
        logits = target.prefill(prompt)
        context = final_hidden(target)  # [len(prompt), hidden]
        tokens: List[int] = []
        ttft = None
        ended = None
        while ended is None:
            history = torch.tensor(prompt + tokens, dtype=torch.long, device=logits.device)
            probs = pipeline.process(logits, history).softmax(dim=-1)
            top = torch.topk(probs, k=min(cfg.top_k, probs.numel()))
            cands = top.indices.tolist()
            k = len(cands)
            base = len(target.tokens)
            rows = target.forward_level(tokens=cands, parents=[-1] * k, base=base, cached=[], nodes=list(range(k)))
            hidden = final_hidden(target)  # [k, hidden]
            chosen = int(torch.argmax(scores(top.values, hidden, context, alpha)))
            target.keep(list(range(base)) + [base + chosen])
            tokens.append(cands[chosen])
            context = torch.cat([context, hidden[chosen:chosen + 1]])
            logits = rows[chosen]
            if ttft is None:
                synchronize(target.device)
                ttft = time.perf_counter() - start
            ended = stop.check(tokens, 1)
        keep, reason = ended
        del tokens[keep:]
        synchronize(target.device)
        return Generation(tokens=tokens, stop_reason=reason, ttft_s=ttft or 0.0, wall_s=time.perf_counter() - start,
                          target_forwards=target.forwards - forwards_before)


def final_hidden(target: LMAdapter) -> torch.Tensor:
    """Float32 final hidden states [rows, hidden] of the last forward: the residual stream's last entry through
    the model's final norm (the stream is captured before it)."""
    stream = target.hidden_states
    if not stream:
        raise RuntimeError("contrastive search reads hidden states: build the target with "
                           "LMAdapter(hidden_states=True)")
    with torch.inference_mode():
        return target.model.model.norm(stream[-1]).float()


def scores(probs: torch.Tensor, hidden: torch.Tensor, context: torch.Tensor, alpha: float) -> torch.Tensor:
    """Contrastive scores [k] of candidates with probabilities ``probs`` [k] and final hidden states
    ``hidden`` [k, d] against the context's ``context`` [n, d]."""
    cand = torch.nn.functional.normalize(hidden, dim=-1)
    ctx = torch.nn.functional.normalize(context, dim=-1)
    penalty = (cand @ ctx.T).max(dim=-1).values
    return (1.0 - alpha) * probs.to(penalty.device) - alpha * penalty

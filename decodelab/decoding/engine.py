"""The decode loop. Plain autoregressive decoding is this loop with a drafter that proposes nothing.

prefill -> [draft -> one target forward over (last token + draft) -> verify -> commit -> crop]* ,
one StepRecord per iteration. Cache invariant between steps: the target cache holds the prompt and
every committed token except the last one (the *root*), which is fed at the start of the next forward.
A chain draft is run as a sequence and cropped to the accepted prefix; a token tree is run under a tree
attention mask and compacted to the accepted path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from transformers import PreTrainedTokenizerBase

from decodelab.decoding import tree
from decodelab.decoding.lm import LMAdapter, synchronize
from decodelab.drafters.base import Draft, Drafter
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.verify import Verdict, verify


@dataclass
class StepRecord:
    drafted: int  # draft tokens verified (a tree's node count)
    accepted: int
    bonus: int
    draft_s: float
    verify_s: float
    depth: int  # the draft's longest path: its length for a chain, the deepest node's depth for a tree


@dataclass
class Generation:
    tokens: List[int]
    stop_reason: str  # eos | stop_string | max_new_tokens
    ttft_s: float
    wall_s: float
    steps: List[StepRecord] = field(default_factory=list)
    target_forwards: int = 0
    draft_forwards: int = 0
    # True when any step used a lossy acceptance rule (typical acceptance): the output does not follow
    # the target distribution, and every record of this generation must say so.
    lossy: bool = False


class StopCriteria:
    """EOS ids, stop strings and the token budget; returns how many tokens to keep once one fires."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Iterable[int], stop_strings: Sequence[str],
                 max_new_tokens: int):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.stop_strings = list(stop_strings)
        self.max_new_tokens = max_new_tokens
        # Decoding only a tail keeps the check cheap; a stop string is never longer than this many tokens.
        self._tail = max((len(s) for s in self.stop_strings), default=0) + 8

    def check(self, tokens: List[int], new: int) -> Optional[tuple]:
        """(keep, reason) if generation must stop given that the last ``new`` tokens were just committed."""
        for i in range(len(tokens) - new, len(tokens)):
            if tokens[i] in self.eos_ids:
                return min(i + 1, self.max_new_tokens), "eos"
            if self.stop_strings and self._stop_string_ends_at(tokens, i):
                return min(i + 1, self.max_new_tokens), "stop_string"
        if len(tokens) >= self.max_new_tokens:
            return self.max_new_tokens, "max_new_tokens"
        return None

    def _stop_string_ends_at(self, tokens: List[int], i: int) -> bool:
        text = self.tokenizer.decode(tokens[max(0, i + 1 - self._tail): i + 1], skip_special_tokens=False)
        prev = self.tokenizer.decode(tokens[max(0, i + 1 - self._tail): i], skip_special_tokens=False)
        return any(s in text and s not in prev for s in self.stop_strings)


def decode(target: LMAdapter, prompt_ids: Sequence[int], *, pipeline: LogitsPipeline, drafter: Drafter,
           stop: StopCriteria, generator: torch.Generator) -> Generation:
    """Decode one prompt; times are wall-clock with the device synchronised."""
    prompt = list(prompt_ids)
    forwards_before = target.forwards
    synchronize(target.device)
    start = time.perf_counter()
    logits = target.prefill(prompt)
    first = verify(Draft(tokens=[]), logits[None], pipeline, generator, prompt).bonus
    synchronize(target.device)
    ttft = time.perf_counter() - start
    tokens = [first]
    drafter.reset(prompt)
    steps: List[StepRecord] = []
    draft_forwards = 0
    lossy = False
    ended = stop.check(tokens, 1)
    while ended is None:
        t0 = time.perf_counter()
        context = prompt + tokens
        draft = fit_draft(drafter.propose(context), stop.max_new_tokens - len(tokens) - 1)
        draft_forwards += draft.forwards
        t1 = time.perf_counter()
        verdict, logits = verify_step(target, draft, pipeline, generator, context)
        synchronize(target.device)
        t2 = time.perf_counter()
        new = verdict.accepted + [verdict.bonus]
        tokens.extend(new)
        # Drafters that learn from the target (token recycling, lookahead) see its logits; counted as draft time.
        drafter.observe([context[-1]] + draft.tokens, logits)
        drafter.update(len(draft), len(verdict.accepted))
        t3 = time.perf_counter()
        steps.append(StepRecord(len(draft), len(verdict.accepted), 1, (t1 - t0) + (t3 - t2), t2 - t1,
                                draft_depth(draft)))
        lossy = lossy or verdict.lossy
        ended = stop.check(tokens, len(new))
    keep, reason = ended
    del tokens[keep:]
    wall = time.perf_counter() - start
    return Generation(tokens=tokens, stop_reason=reason, ttft_s=ttft, wall_s=wall, steps=steps,
                      target_forwards=target.forwards - forwards_before, draft_forwards=draft_forwards, lossy=lossy)


def draft_depth(draft: Draft) -> int:
    """The most tokens one step can accept from ``draft``: its length, or a tree's deepest level."""
    if draft.parents is None:
        return len(draft)
    return max(tree.depths(draft.parents), default=0)


def fit_draft(draft: Draft, depth: int) -> Draft:
    """``draft`` cut to at most ``depth`` tokens deep: the step's bonus token takes the last place in the
    token budget, so deeper tokens would be verified only to be thrown away and would inflate tau
    (transformers caps its candidates the same way). A tree keeps the nodes of depth <= ``depth``."""
    depth = max(depth, 0)
    if draft.parents is None:
        if len(draft) <= depth:
            return draft
        keep = list(range(depth))
        parents = None
    else:
        levels = tree.depths(draft.parents)
        keep = [node for node, level in enumerate(levels) if level <= depth]
        if len(keep) == len(draft):
            return draft
        index = {node: i for i, node in enumerate(keep)}
        parents = [index.get(draft.parents[node], tree.ROOT) for node in keep]
    probs = None if draft.probs is None else draft.probs[keep]
    return Draft(tokens=[draft.tokens[node] for node in keep], probs=probs, forwards=draft.forwards,
                 parents=parents if keep else None)


def verify_step(target: LMAdapter, draft: Draft, pipeline: LogitsPipeline, generator: torch.Generator,
                context: List[int]) -> Tuple[Verdict, torch.Tensor]:
    """One target forward over the root (``context[-1]``) and the draft, the verdict, and the cache cut back
    to the root plus the accepted tokens (the bonus is fed with the next draft). Returns the raw logits too."""
    cached = len(target.tokens)
    if draft.parents is None or len(draft) == 0:
        logits = target.forward([context[-1]] + draft.tokens)
        verdict = verify(draft, logits, pipeline, generator, context)
        target.crop(cached + 1 + len(verdict.accepted))
    else:
        logits = target.forward_tree([context[-1]] + draft.tokens, draft.parents)
        verdict = verify(draft, logits, pipeline, generator, context)
        target.keep(list(range(cached + 1)) + [cached + 1 + node for node in verdict.nodes])
    return verdict, logits


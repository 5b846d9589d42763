"""The decode loop. Plain autoregressive decoding is this loop with a drafter that proposes nothing.

prefill -> [draft -> one target forward over (last token + draft) -> verify -> commit -> crop]* ,
one StepRecord per iteration. Cache invariant between steps: the target cache holds the prompt and
every committed token except the last one (the *root*), which is fed at the start of the next forward.
A chain draft is run as a sequence and cropped to the accepted prefix; a token tree is run under a tree
attention mask and compacted to the accepted path.
"""

from __future__ import annotations

import time
from typing import List, Sequence, Tuple

import torch

from decodelab.decoding import tree
from decodelab.decoding.lm import LMAdapter, synchronize
from decodelab.decoding.logits import LogitsPipeline
from decodelab.decoding.stop import StopCriteria
from decodelab.decoding.types import Draft, Generation, Proposer, StepRecord, Verdict
from decodelab.decoding.verify import verify


def decode(target: LMAdapter, prompt_ids: Sequence[int], *, pipeline: LogitsPipeline, drafter: Proposer,
           stop: StopCriteria, generator: torch.Generator) -> Generation:
    """Decode one prompt; times are wall-clock with the device synchronised."""
    prompt = list(prompt_ids)
    forwards_before, aux_before = target.forwards, target.aux_forwards
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
                      target_forwards=target.forwards - forwards_before, draft_forwards=draft_forwards,
                      aux_forwards=target.aux_forwards - aux_before, lossy=lossy)


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


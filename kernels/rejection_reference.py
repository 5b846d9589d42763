"""The torch reference of :mod:`decodelab.kernels.rejection`: the verifier's own rules, row by row.

Each batch row goes through the very functions ``decodelab.decoding.verify`` runs for ``backend.kernels=torch``
(:func:`~decodelab.decoding.verify.verify_greedy`, :func:`~decodelab.decoding.verify.chain_rejection`,
:func:`~decodelab.decoding.verify.tree_greedy`, :func:`~decodelab.decoding.verify.tree_rejection`) with the
given uniforms and the race over the given noise as the sampler; so the kernel tests hold the kernels to
the torch path itself, draw for draw. Shapes and outputs are those of the kernels (see there).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from decodelab.decoding.verify import chain_rejection, tree_greedy, tree_rejection, verify_greedy
from decodelab.kernels.logits_reference import racer

# Pads the token and node outputs after the last meaningful entry (vLLM's PLACEHOLDER_TOKEN_ID).
PLACEHOLDER = -1


class ChainOutput(NamedTuple):
    tokens: torch.Tensor        # [B, K + 1] long: accepted draft tokens, the recovered or bonus token, then -1
    num_accepted: torch.Tensor  # [B] long


class TreeOutput(NamedTuple):
    nodes: torch.Tensor         # [B, N] long: the accepted path's node indices, root side first, then -1
    num_accepted: torch.Tensor  # [B] long
    bonus: torch.Tensor         # [B] long: the recovered or bonus token after the path


def lengths(count: Optional[torch.Tensor], batch: int, full: int) -> List[int]:
    """Per-row counts (draft tokens or tree nodes) as ints; every row ``full`` when ``count`` is None."""
    return [full] * batch if count is None else [int(c) for c in count.tolist()]


def chain_reference(draft_ids: torch.Tensor, target: torch.Tensor, draft_probs: Optional[torch.Tensor],
                    uniforms: Optional[torch.Tensor], noise: Optional[torch.Tensor], *, greedy: bool,
                    num_draft: Optional[torch.Tensor] = None) -> ChainOutput:
    batch, k_max = draft_ids.shape
    tokens = torch.full((batch, k_max + 1), PLACEHOLDER, dtype=torch.long)
    accepted = torch.zeros(batch, dtype=torch.long)
    for b, k in enumerate(lengths(num_draft, batch, k_max)):
        draft = draft_ids[b, :k].tolist()
        if greedy:
            verdict = verify_greedy(draft, target[b, :k + 1].argmax(dim=-1).tolist())
        else:
            q = None if draft_probs is None else draft_probs[b, :k]
            verdict = chain_rejection(draft, target[b, :k + 1], q, uniforms[b, :k], racer(noise[b]))
        emitted = verdict.accepted + [verdict.bonus]
        tokens[b, :len(emitted)] = torch.tensor(emitted)
        accepted[b] = len(verdict.accepted)
    return ChainOutput(tokens.to(draft_ids.device), accepted.to(draft_ids.device))


def tree_reference(tokens: torch.Tensor, parents: torch.Tensor, target: torch.Tensor,
                   draft_probs: Optional[torch.Tensor], uniforms: Optional[torch.Tensor],
                   noise: Optional[torch.Tensor], *, greedy: bool,
                   num_nodes: Optional[torch.Tensor] = None) -> TreeOutput:
    batch, n_max = tokens.shape
    nodes = torch.full((batch, n_max), PLACEHOLDER, dtype=torch.long)
    accepted = torch.zeros(batch, dtype=torch.long)
    bonus = torch.zeros(batch, dtype=torch.long)
    for b, n in enumerate(lengths(num_nodes, batch, n_max)):
        ids, par = tokens[b, :n].tolist(), parents[b, :n].tolist()
        if greedy:
            verdict = tree_greedy(ids, par, target[b, :n + 1].argmax(dim=-1).tolist())
        else:
            q = None if draft_probs is None else draft_probs[b, :n]
            verdict = tree_rejection(ids, par, target[b, :n + 1], q, uniforms[b, :n], racer(noise[b]))
        nodes[b, :len(verdict.nodes)] = torch.tensor(verdict.nodes, dtype=torch.long)
        accepted[b] = len(verdict.nodes)
        bonus[b] = verdict.bonus
    device = tokens.device
    return TreeOutput(nodes.to(device), accepted.to(device), bonus.to(device))

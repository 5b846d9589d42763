"""Rejection samplers for speculative decoding in Triton: chains and token trees, greedy and stochastic.

Terms (as vLLM's rejection sampler uses them). For a draft x_1..x_k verified against target
distributions p_1..p_{k+1} (row i + 1 follows x_i; in a tree, a node is checked against its parent's row):

- **accepted** tokens: the draft prefix that passes. Greedy: x_i == argmax of row i. Stochastic: x_i passes
  with probability min(1, p_i(x_i) / q_i(x_i)), tested as ``u_i * q_i(x_i) < p_i(x_i)`` with ``q`` the draft's
  distribution, or 1 when the draft has none (n-gram / prompt-lookup drafts: one-hot q).
- **recovered** token: at the first rejected position i, a token from the residual norm(max(0, p_i - q_i))
  (one-hot q: p_i without x_i; p_i itself when nothing is left); greedy: the argmax of row i.
- **bonus** token: when all k pass, a token from p_{k+1} (greedy: its argmax).

Each step emits the accepted tokens plus exactly one recovered or bonus token; decodelab's ``Verdict``
calls that one ``bonus`` either way. A tree (SpecInfer's multi-draft rule, as
``decodelab.decoding.verify.tree_speculative_sampling``) tries a node's children in draft order against the
current distribution, which each rejected sibling turns into its residual; the first child accepted is
descended into, and when every child of a node is rejected (or it is a leaf) the token after the path is
drawn from the current distribution. Greedy trees take the deepest path whose every token is its parent
row's argmax, the first such in draft order.

Randomness comes in as tensors drawn by the caller from its generator: ``uniforms`` [B, K] (one per draft
token or tree node, in draft order) and Exp(1) ``noise`` [B, V] for the one token each row draws, by the
exponential race ``argmax(dist / noise)`` (what ``torch.multinomial(dist, 1)`` computes). With the same
inputs, :mod:`decodelab.kernels.rejection_reference` (the verifier's own torch rules) gives the same tokens.

Layout: a program owns a tile of batch rows (:mod:`~decodelab.kernels.common`). A chain program runs the
acceptance scan on [ROWS] vectors (two gathers per draft position) and then sweeps the vocabulary twice for
the one token each row draws, so only the needed residual is ever formed (vLLM instead forms every
position's candidate in parallel: more parallel for a batch of one, more work). Greedy first takes every
row's argmax in parallel. A tree program walks the whole tree on the device: each row's current
distribution lives in a [B, V] scratch row, rewritten in place by each rejected sibling's residual; the walk
is sequential by nature, so trees are parallel across the batch only, and sweeps no row needs are skipped.
Token ids must be < V (larger ones are never accepted). Rows whose ``num_draft`` / ``num_nodes`` is below
K / N ignore the rest.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from decodelab.kernels.common import launch_argmax_rows, race_rows, race_update, tile_shape
from decodelab.kernels.rejection_reference import PLACEHOLDER, ChainOutput, TreeOutput


@triton.jit
def _left(p, q_rows, tokens, offsets, mask, HAS_Q: tl.constexpr):
    """What is left of a [ROWS, BLOCK] block of p once the draft's share is taken: max(0, p - q) per row, or
    (one-hot drafts) p without the row's token."""
    if HAS_Q:
        left = tl.maximum(p - tl.load(q_rows[:, None] + offsets[None, :], mask=mask, other=0.0), 0.0)
    else:
        left = tl.where(offsets[None, :] == tokens[:, None], 0.0, p)
    return left


@triton.jit
def _left_total(p_rows, q_rows, tokens, row_mask, V, HAS_Q: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Per row, sum(left) (0 for rows outside ``row_mask``)."""
    total = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (offsets < V)[None, :]
        p = tl.load(p_rows[:, None] + offsets[None, :], mask=mask, other=0.0)
        total += tl.sum(_left(p, q_rows, tokens, offsets, mask, HAS_Q), axis=1)
    return total


@triton.jit
def _chain_kernel(draft_ptr, num_draft_ptr, target_ptr, q_ptr, u_ptr, noise_ptr, choice_ptr, out_ptr, accepted_ptr,
                  B, K, V, GREEDY: tl.constexpr, HAS_Q: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    b = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_ok = b < B
    k = tl.load(num_draft_ptr + b, mask=row_ok, other=0)
    n = k  # per row, the first rejected position; k while every token passes
    for i in range(K):
        scanning = row_ok & (i < k) & (n == k)
        x = tl.load(draft_ptr + b * K + i, mask=scanning, other=0)
        if GREEDY:
            passed = x == tl.load(choice_ptr + b * (K + 1) + i, mask=scanning, other=-1)
        else:
            gather = scanning & (x < V)
            p_x = tl.load(target_ptr + (b * (K + 1) + i) * V + x, mask=gather, other=0.0)
            q_x = tl.full([ROWS], 1.0, tl.float32)
            if HAS_Q:
                q_x = tl.load(q_ptr + (b * K + i) * V + x, mask=gather, other=0.0)
            passed = tl.load(u_ptr + b * K + i, mask=scanning, other=1.0) * q_x < p_x
        tl.store(out_ptr + b * (K + 1) + i, x, mask=scanning & passed)
        n = tl.where(scanning & ~passed, i, n)
    if GREEDY:
        token = tl.load(choice_ptr + b * (K + 1) + n, mask=row_ok, other=0)
    else:
        # One sweep pair serves both cases: rows that rejected draw from their residual, the others from p_{k+1}.
        recovering = row_ok & (n < k)
        p_rows = target_ptr + (b * (K + 1) + n) * V
        q_rows = q_ptr + (b * K + n) * V
        rejected_token = tl.load(draft_ptr + b * K + n, mask=recovering, other=0)
        total = tl.zeros([ROWS], dtype=tl.float32)
        if tl.max(recovering.to(tl.int32), axis=0) > 0:
            total = _left_total(p_rows, q_rows, rejected_token, recovering, V, HAS_Q, ROWS, BLOCK)
        use_left = recovering & (total > 0)  # nothing left: verify.residual keeps p
        divisor = tl.where(use_left, total, 1.0)
        best = tl.full([ROWS], -1.0, tl.float32)
        best_index = tl.zeros([ROWS], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = row_ok[:, None] & (offsets < V)[None, :]
            p = tl.load(p_rows[:, None] + offsets[None, :], mask=mask, other=0.0)
            left = _left(p, q_rows, rejected_token, offsets, mask & use_left[:, None], HAS_Q)
            dist = tl.where(use_left[:, None], left / divisor[:, None], p)
            noise = tl.load(noise_ptr + b[:, None] * V + offsets[None, :], mask=mask, other=1.0)
            best, best_index = race_update(best, best_index, dist / noise, start, mask)
        token = best_index
    tl.store(out_ptr + b * (K + 1) + n, token.to(tl.int64), mask=row_ok)
    tl.store(accepted_ptr + b, n.to(tl.int64), mask=row_ok)


@triton.jit
def _copy_rows(src_rows, dst_rows, row_mask, V, BLOCK: tl.constexpr):
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (offsets < V)[None, :]
        block = tl.load(src_rows[:, None] + offsets[None, :], mask=mask, other=0.0)
        tl.store(dst_rows[:, None] + offsets[None, :], block, mask=mask)
    tl.debug_barrier()  # the walk next gathers single entries that other threads wrote


@triton.jit
def _residual_in_place(dist_rows, q_rows, tokens, row_mask, V, HAS_Q: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """dist <- verify.residual(dist, q, token) in the scratch rows of ``row_mask``."""
    total = _left_total(dist_rows, q_rows, tokens, row_mask, V, HAS_Q, ROWS, BLOCK)
    use_left = row_mask & (total > 0)
    divisor = tl.where(use_left, total, 1.0)
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = use_left[:, None] & (offsets < V)[None, :]
        dist = tl.load(dist_rows[:, None] + offsets[None, :], mask=mask, other=0.0)
        left = _left(dist, q_rows, tokens, offsets, mask, HAS_Q)
        tl.store(dist_rows[:, None] + offsets[None, :], left / divisor[:, None], mask=mask)
    tl.debug_barrier()


@triton.jit
def _tree_sample_kernel(tokens_ptr, parents_ptr, num_nodes_ptr, target_ptr, q_ptr, u_ptr, noise_ptr, dist_ptr,
                        nodes_ptr, accepted_ptr, bonus_ptr, B, N, V, HAS_Q: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):
    b = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_ok = b < B
    n = tl.load(num_nodes_ptr + b, mask=row_ok, other=0)
    dist_rows = dist_ptr + b * V
    _copy_rows(target_ptr + b * (N + 1) * V, dist_rows, row_ok, V, BLOCK)
    node = tl.full([ROWS], -1, tl.int32)
    depth = tl.zeros([ROWS], dtype=tl.int32)
    walking = row_ok
    for _level in range(N + 1):
        if tl.max(walking.to(tl.int32), axis=0) > 0:
            chosen = tl.full([ROWS], -1, tl.int32)
            for j in range(N):  # the children of each row's node, in draft order, until one is accepted
                parent = tl.load(parents_ptr + b * N + j, mask=row_ok, other=-2)
                trying = walking & (j < n) & (parent == node) & (chosen < 0)
                if tl.max(trying.to(tl.int32), axis=0) > 0:
                    x = tl.load(tokens_ptr + b * N + j, mask=trying, other=0)
                    gather = trying & (x < V)
                    q_x = tl.full([ROWS], 1.0, tl.float32)
                    if HAS_Q:
                        q_x = tl.load(q_ptr + (b * N + j) * V + x, mask=gather, other=0.0)
                    dist_x = tl.load(dist_rows + x, mask=gather, other=0.0)
                    accept = trying & (tl.load(u_ptr + b * N + j, mask=trying, other=1.0) * q_x < dist_x)
                    chosen = tl.where(accept, j, chosen)
                    rejected = trying & ~accept
                    if tl.max(rejected.to(tl.int32), axis=0) > 0:
                        _residual_in_place(dist_rows, q_ptr + (b * N + j) * V, x, rejected, V, HAS_Q, ROWS, BLOCK)
            descend = walking & (chosen >= 0)
            tl.store(nodes_ptr + b * N + depth, chosen.to(tl.int64), mask=descend)
            depth = tl.where(descend, depth + 1, depth)
            node = tl.where(descend, chosen, node)
            walking = descend
            if tl.max(descend.to(tl.int32), axis=0) > 0:
                _copy_rows(target_ptr + (b * (N + 1) + chosen + 1) * V, dist_rows, descend, V, BLOCK)
    tl.store(accepted_ptr + b, depth.to(tl.int64), mask=row_ok)
    bonus = race_rows(dist_rows, noise_ptr + b * V, row_ok, V, ROWS, BLOCK)
    tl.store(bonus_ptr + b, bonus.to(tl.int64), mask=row_ok)


@triton.jit
def _tree_greedy_kernel(tokens_ptr, parents_ptr, num_nodes_ptr, choice_ptr, nodes_ptr, accepted_ptr, bonus_ptr,
                        B, N, ROWS: tl.constexpr, NODES: tl.constexpr):
    b = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_ok = b < B
    n = tl.load(num_nodes_ptr + b, mask=row_ok, other=0)
    index = tl.arange(0, NODES)
    depth = tl.zeros([ROWS, NODES], dtype=tl.int32)  # a node's depth if its whole root path passed, else 0
    best = tl.full([ROWS], -1, tl.int32)
    best_depth = tl.zeros([ROWS], dtype=tl.int32)
    for j in range(N):
        parent = tl.load(parents_ptr + b * N + j, mask=row_ok, other=-1)
        parent_depth = tl.sum(tl.where(index[None, :] == parent[:, None], depth, 0), axis=1)
        on_path = (parent < 0) | (parent_depth > 0)
        token = tl.load(tokens_ptr + b * N + j, mask=row_ok, other=0)
        choice = tl.load(choice_ptr + b * (N + 1) + parent + 1, mask=row_ok, other=-1)
        d = tl.where(row_ok & (j < n) & on_path & (token == choice), parent_depth + 1, 0)
        depth = tl.where(index[None, :] == j, d[:, None], depth)
        deeper = d > best_depth  # strict: the first deepest node in draft order wins
        best = tl.where(deeper, j, best)
        best_depth = tl.where(deeper, d, best_depth)
    node = best
    for step in range(N):  # write each path from its end up
        position = best_depth - 1 - step
        writing = row_ok & (position >= 0)
        tl.store(nodes_ptr + b * N + position, node.to(tl.int64), mask=writing)
        node = tl.where(writing, tl.load(parents_ptr + b * N + node, mask=writing, other=-1), node)
    tl.store(accepted_ptr + b, best_depth.to(tl.int64), mask=row_ok)
    bonus = tl.load(choice_ptr + b * (N + 1) + best + 1, mask=row_ok, other=0)
    tl.store(bonus_ptr + b, bonus.to(tl.int64), mask=row_ok)


# --------------------------------------------------------------------------------------------------

Tile = Optional[Tuple[int, int]]


def chain_rejection_sample(draft_ids: torch.Tensor, target: torch.Tensor, draft_probs: Optional[torch.Tensor],
                           uniforms: Optional[torch.Tensor], noise: Optional[torch.Tensor], *, greedy: bool,
                           num_draft: Optional[torch.Tensor] = None, tile: Tile = None) -> ChainOutput:
    """Verify B chains of up to K tokens ``draft_ids`` [B, K] against ``target`` [B, K + 1, V].

    Greedy: ``target`` holds any scores whose argmax is the target's choice (processed logits); no random
    inputs. Stochastic: ``target`` holds probabilities, ``draft_probs`` [B, K, V] the draft's (None: one-hot
    drafts), ``uniforms`` [B, K] and ``noise`` [B, V]. ``tile`` overrides (rows per program, block) for tests.
    """
    batch, k_max = draft_ids.shape
    vocab = target.size(-1)
    _check_shapes(target, (batch, k_max + 1, vocab), draft_probs, uniforms, noise, greedy)
    device = target.device
    target = target.float().contiguous()
    ids = draft_ids.to(device=device, dtype=torch.long).contiguous()
    counts = _counts(num_draft, batch, k_max, device)
    out = torch.full((batch, k_max + 1), PLACEHOLDER, dtype=torch.long, device=device)
    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    if batch == 0:
        return ChainOutput(out, accepted)
    choice = torch.zeros(batch * (k_max + 1), dtype=torch.int32, device=device)
    if greedy:
        launch_argmax_rows(target.view(-1, vocab), choice, tile)
    rows, block = tile_shape(batch, vocab, tile)
    q = target if draft_probs is None else draft_probs.float().contiguous()
    u = target if greedy else uniforms.float().contiguous()
    z = target if greedy else noise.float().contiguous()
    _chain_kernel[(triton.cdiv(batch, rows),)](ids, counts, target, q, u, z, choice, out, accepted, batch, k_max,
                                               vocab, GREEDY=greedy, HAS_Q=draft_probs is not None, ROWS=rows,
                                               BLOCK=block)
    return ChainOutput(out, accepted)


def tree_rejection_sample(tokens: torch.Tensor, parents: torch.Tensor, target: torch.Tensor,
                          draft_probs: Optional[torch.Tensor], uniforms: Optional[torch.Tensor],
                          noise: Optional[torch.Tensor], *, greedy: bool, num_nodes: Optional[torch.Tensor] = None,
                          tile: Tile = None) -> TreeOutput:
    """Verify B token trees ``tokens`` [B, N] with ``parents`` [B, N] (-1: a child of the root; parents come
    first) against ``target`` [B, N + 1, V] (row 0: after the root; row i + 1: after node i). Inputs otherwise
    as :func:`chain_rejection_sample`, with one uniform and one draft distribution per node."""
    batch, n_max = tokens.shape
    vocab = target.size(-1)
    _check_shapes(target, (batch, n_max + 1, vocab), draft_probs, uniforms, noise, greedy)
    if tuple(parents.shape) != (batch, n_max):
        raise ValueError(f"parents must be [B, N] = {(batch, n_max)}, got {tuple(parents.shape)}")
    device = target.device
    target = target.float().contiguous()
    ids = tokens.to(device=device, dtype=torch.long).contiguous()
    counts = _counts(num_nodes, batch, n_max, device)
    # Nodes past a row's count may hold anything: make them children of the root, which the walk never visits.
    padding = torch.arange(n_max, device=device)[None, :] >= counts[:, None]
    par = parents.to(device=device).masked_fill(padding, -1).to(torch.int32).contiguous()
    nodes = torch.full((batch, n_max), PLACEHOLDER, dtype=torch.long, device=device)
    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    bonus = torch.zeros(batch, dtype=torch.long, device=device)
    if batch == 0:
        return TreeOutput(nodes, accepted, bonus)
    rows, block = tile_shape(batch, vocab, tile)
    if greedy:
        choice = torch.empty(batch * (n_max + 1), dtype=torch.int32, device=device)
        launch_argmax_rows(target.view(-1, vocab), choice, tile)
        _tree_greedy_kernel[(triton.cdiv(batch, rows),)](ids, par, counts, choice, nodes, accepted, bonus, batch,
                                                         n_max, ROWS=rows,
                                                         NODES=triton.next_power_of_2(max(n_max, 1)))
    else:
        q = target if draft_probs is None else draft_probs.float().contiguous()
        dist = torch.empty(batch, vocab, dtype=torch.float32, device=device)
        _tree_sample_kernel[(triton.cdiv(batch, rows),)](ids, par, counts, target, q, uniforms.float().contiguous(),
                                                         noise.float().contiguous(), dist, nodes, accepted, bonus,
                                                         batch, n_max, vocab, HAS_Q=draft_probs is not None,
                                                         ROWS=rows, BLOCK=block)
    return TreeOutput(nodes, accepted, bonus)


def _check_shapes(target: torch.Tensor, expected: tuple, draft_probs: Optional[torch.Tensor],
                  uniforms: Optional[torch.Tensor], noise: Optional[torch.Tensor], greedy: bool) -> None:
    batch, rows, vocab = expected
    if tuple(target.shape) != expected:
        raise ValueError(f"target must be [B, K + 1, V] = {expected}, got {tuple(target.shape)}")
    if greedy:
        return
    if uniforms is None or noise is None:
        raise ValueError("stochastic verification needs uniforms [B, K] and noise [B, V]")
    if tuple(uniforms.shape) != (batch, rows - 1) or tuple(noise.shape) != (batch, vocab):
        raise ValueError(f"uniforms must be {(batch, rows - 1)} and noise {(batch, vocab)}, got "
                         f"{tuple(uniforms.shape)} and {tuple(noise.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (batch, rows - 1, vocab):
        raise ValueError(f"draft_probs must be {(batch, rows - 1, vocab)}, got {tuple(draft_probs.shape)}")


def _counts(count: Optional[torch.Tensor], batch: int, full: int, device: torch.device) -> torch.Tensor:
    if count is None:
        return torch.full((batch,), full, dtype=torch.int32, device=device)
    return count.to(device=device, dtype=torch.int32).clamp(0, full).contiguous()

"""Fused sampling filters in Triton: temperature, top-k, top-p, min-p -> probabilities, and a draw from them.

Semantics are those of :mod:`decodelab.decoding.logits` (transformers' warpers, in that order, with
``min_tokens_to_keep=1``); :func:`decodelab.kernels.logits_reference.reference_probs` composes those very
functions and is what the tests hold this kernel to. No sort: each filter becomes a threshold found by
bisection, as FlashInfer's sampling kernels do, but over the int32 keys that order float32 values exactly
(:func:`~decodelab.kernels.common.float_key`), so every bisection ends on a value of the row after at most
33 sweeps of it (usually far fewer: bounds snap to values of the row). A program owns a tile of rows
(:mod:`~decodelab.kernels.common`); the token is drawn by the race ``argmax(probs / noise)`` in the last sweep.

- top-k: the k-th largest scaled logit t (the largest t with at least k logits >= t); logits >= t stay,
  so ties with the k-th value all stay, as in the reference.
- top-p: the reference drops a token when the ascending cumulative mass up to it (float64 accumulation,
  rounded to float32, as torch's CPU cumsum) is <= 1 - top_p. That mass is monotone in the logit, so the
  kept set is the logits >= the smallest survivor whose rounded mass exceeds 1 - top_p; the mass is
  accumulated here in float64 and rounded the same way.
- min-p: drop p < min_p * p_max with p the softmax over the survivors, computed as the reference does.

Where the kept set can differ from the reference's: exact ties at the top-p boundary (torch sorts tied
logits in an unspecified order and may cut inside a run of equal values; here a run stays or goes whole),
-0.0 vs +0.0 logits (ordered here), and a token whose cumulative mass lies within float32 rounding of
1 - top_p or whose probability lies within rounding of the min-p floor (the two sides compute exp and the
softmax sum in different orders). The tests check that every difference is of that kind.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from decodelab.kernels.common import float_key, race_update, tile_shape

INT32_MAX = 2147483647
INT32_MIN = -2147483648


@triton.jit
def _scaled(logits_ptr, base, offsets, mask, temperature, TEMPERATURE: tl.constexpr):
    """A [ROWS, BLOCK] block of logits divided by the temperature (as torch divides); -inf outside the rows."""
    x = tl.load(logits_ptr + base[:, None] + offsets[None, :], mask=mask, other=float("-inf"))
    if TEMPERATURE:
        x = x / temperature
    return x


@triton.jit
def _top_k_key(logits_ptr, base, row_ok, V, temperature, k, key_lo, key_hi,
               TEMPERATURE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, the key of the k-th largest logit: the largest t with count(key >= t) >= k.

    Invariant: lo is a key of the row with count(>= lo) >= k, and count(>= hi) < k. Each sweep snaps lo up to
    the smallest key >= mid, or hi down past the largest key < mid, and a row ends at once when exactly k keys
    are >= mid; finished rows keep their bounds.
    """
    lo = key_lo.to(tl.int64)
    hi = key_hi.to(tl.int64) + 1
    while tl.max(hi - lo, axis=0) > 1:
        active = hi - lo > 1
        mid = lo + (hi - lo) // 2
        count = tl.zeros([ROWS], dtype=tl.int32)
        min_ge = hi
        max_lt = lo
        for start in range(0, V, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = row_ok[:, None] & (offsets < V)[None, :]
            key = float_key(_scaled(logits_ptr, base, offsets, mask, temperature, TEMPERATURE)).to(tl.int64)
            ge = mask & (key >= mid[:, None])
            count += tl.sum(ge.to(tl.int32), axis=1)
            min_ge = tl.minimum(min_ge, tl.min(tl.where(ge, key, hi[:, None]), axis=1))
            max_lt = tl.maximum(max_lt, tl.max(tl.where(mask & (key < mid[:, None]), key, lo[:, None]), axis=1))
        enough = count >= k
        new_hi = tl.where(enough, tl.where(count == k, min_ge + 1, hi), max_lt + 1)
        lo = tl.where(active & enough, min_ge, lo)
        hi = tl.where(active, new_hi, hi)
    return lo


@triton.jit
def _mass(logits_ptr, base, row_ok, V, temperature, row_max, keep,
          TEMPERATURE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, sum(exp(x - max)) over the logits whose key is >= keep: the survivors' softmax denominator."""
    total = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (offsets < V)[None, :]
        x = _scaled(logits_ptr, base, offsets, mask, temperature, TEMPERATURE)
        alive = mask & (float_key(x).to(tl.int64) >= keep[:, None])
        total += tl.sum(tl.where(alive, tl.exp(x - row_max[:, None]), 0.0), axis=1)
    return tl.where(row_ok, total, 1.0)  # rows past R divide by 1


@triton.jit
def _top_p_key(logits_ptr, base, row_ok, V, temperature, row_max, total, keep, key_hi, drop_mass,
               TEMPERATURE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, the smallest surviving key t whose ascending mass F(t) (survivors with key <= t, float64,
    rounded to float32) exceeds ``drop_mass`` = 1 - top_p.

    Invariant: F(lo) <= drop_mass; hi is a surviving key with F(hi) > drop_mass, or the top key, which always
    stays (min_tokens_to_keep = 1).
    """
    lo = keep - 1
    hi = key_hi.to(tl.int64)
    while tl.max(hi - lo, axis=0) > 1:
        active = hi - lo > 1
        mid = lo + (hi - lo) // 2
        mass = tl.zeros([ROWS], dtype=tl.float64)
        max_le = lo
        min_gt = hi
        for start in range(0, V, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = row_ok[:, None] & (offsets < V)[None, :]
            x = _scaled(logits_ptr, base, offsets, mask, temperature, TEMPERATURE)
            key = float_key(x).to(tl.int64)
            alive = mask & (key >= keep[:, None])
            below = alive & (key <= mid[:, None])
            probs = tl.exp(x - row_max[:, None]) / total[:, None]
            mass += tl.sum(tl.where(below, probs, 0.0).to(tl.float64), axis=1)
            max_le = tl.maximum(max_le, tl.max(tl.where(below, key, lo[:, None]), axis=1))
            min_gt = tl.minimum(min_gt, tl.min(tl.where(alive & (key > mid[:, None]), key, hi[:, None]), axis=1))
        above = mass.to(tl.float32) > drop_mass
        hi = tl.where(active & above, max_le, hi)
        lo = tl.where(active & ~above, min_gt - 1, lo)
    return hi


@triton.jit
def _survivors(x, mask, row_max, keep, min_p_total, floor, MIN_P: tl.constexpr):
    """exp(x - max) of a block and which entries survive every filter."""
    e = tl.exp(x - row_max[:, None])
    kept = mask & (float_key(x).to(tl.int64) >= keep[:, None])
    if MIN_P:
        kept = kept & (e / min_p_total[:, None] >= floor[:, None])
    return e, kept


@triton.jit
def _warp_kernel(logits_ptr, probs_ptr, noise_ptr, tokens_ptr, R, V, temperature, top_k, drop_mass, min_p,
                 TEMPERATURE: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr,
                 SAMPLE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_ok = rows < R
    base = rows * V
    # Sweep 1: each row's maximum and key range.
    row_max = tl.full([ROWS], float("-inf"), tl.float32)
    key_lo = tl.full([ROWS], INT32_MAX, tl.int32)
    key_hi = tl.full([ROWS], INT32_MIN, tl.int32)
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (offsets < V)[None, :]
        x = _scaled(logits_ptr, base, offsets, mask, temperature, TEMPERATURE)
        key = float_key(x)
        row_max = tl.maximum(row_max, tl.max(x, axis=1))
        key_lo = tl.minimum(key_lo, tl.min(tl.where(mask, key, INT32_MAX), axis=1))
        key_hi = tl.maximum(key_hi, tl.max(tl.where(mask, key, INT32_MIN), axis=1))
    row_max = tl.where(row_ok, row_max, 0.0)  # rows past R: keep their (masked) arithmetic finite
    # Survivors: key >= keep (and, with min-p, probability >= floor).
    keep = key_lo.to(tl.int64)
    if TOP_K:
        keep = _top_k_key(logits_ptr, base, row_ok, V, temperature, top_k, key_lo, key_hi,
                          TEMPERATURE, ROWS, BLOCK)
    if TOP_P:
        total = _mass(logits_ptr, base, row_ok, V, temperature, row_max, keep, TEMPERATURE, ROWS, BLOCK)
        keep = _top_p_key(logits_ptr, base, row_ok, V, temperature, row_max, total, keep, key_hi, drop_mass,
                          TEMPERATURE, ROWS, BLOCK)
    min_p_total = tl.full([ROWS], 1.0, tl.float32)
    floor = tl.zeros([ROWS], dtype=tl.float32)
    if MIN_P:
        min_p_total = _mass(logits_ptr, base, row_ok, V, temperature, row_max, keep, TEMPERATURE, ROWS, BLOCK)
        floor = min_p * (1.0 / min_p_total)  # min_p * p_max: the top logit's exp(x - max) is exactly 1
    final_total = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (offsets < V)[None, :]
        x = _scaled(logits_ptr, base, offsets, mask, temperature, TEMPERATURE)
        e, kept = _survivors(x, mask, row_max, keep, min_p_total, floor, MIN_P)
        final_total += tl.sum(tl.where(kept, e, 0.0), axis=1)
    final_total = tl.where(row_ok, final_total, 1.0)
    best = tl.full([ROWS], -1.0, tl.float32)
    best_index = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (offsets < V)[None, :]
        x = _scaled(logits_ptr, base, offsets, mask, temperature, TEMPERATURE)
        e, kept = _survivors(x, mask, row_max, keep, min_p_total, floor, MIN_P)
        probs = tl.where(kept, e / final_total[:, None], 0.0)
        tl.store(probs_ptr + base[:, None] + offsets[None, :], probs, mask=mask)
        if SAMPLE:
            noise = tl.load(noise_ptr + base[:, None] + offsets[None, :], mask=mask, other=1.0)
            best, best_index = race_update(best, best_index, probs / noise, start, mask)
    if SAMPLE:
        tl.store(tokens_ptr + rows, best_index.to(tl.int64), mask=row_ok)


def fused_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0, noise: Optional[torch.Tensor] = None,
                tile: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Probabilities [rows, V] float32 after the filters (each off at 1, 0, 1, 0, as in the pipeline), and the
    tokens [rows] ``argmax(probs / noise)`` picks when ``noise`` (Exp(1), [rows, V]) is given, else None.

    ``tile`` overrides (rows per program, entries per block); see :func:`~decodelab.kernels.common.tile_shape`.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    x = logits.float().contiguous()
    rows, vocab = x.shape
    probs = torch.empty_like(x)
    sample = noise is not None
    if sample and tuple(noise.shape) != (rows, vocab):
        raise ValueError(f"noise must be [rows, vocab] = {(rows, vocab)}, got {tuple(noise.shape)}")
    noise = noise.float().contiguous() if sample else x
    tokens = torch.empty(rows, dtype=torch.long, device=x.device)
    k = min(max(int(top_k), 1), vocab) if top_k > 0 else vocab
    tile_rows, block = tile_shape(rows, vocab, tile)
    if rows:
        _warp_kernel[(triton.cdiv(rows, tile_rows),)](
            x, probs, noise, tokens, rows, vocab, float(temperature), k, 1.0 - float(top_p), float(min_p),
            TEMPERATURE=temperature != 1.0, TOP_K=k < vocab, TOP_P=top_p < 1.0, MIN_P=min_p > 0.0,
            SAMPLE=sample, ROWS=tile_rows, BLOCK=block)
    return probs, tokens if sample else None

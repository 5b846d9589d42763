"""What the Triton kernels share: tile shapes, exact float ordering, the exponential race, row argmax.

Every kernel works on tiles of ``ROWS`` rows (sequences, trees, logits rows) by ``BLOCK`` vocabulary entries:
a program owns ROWS rows and sweeps the vocabulary in blocks; per-row state (maxima, bisection bounds,
acceptance) is a [ROWS] vector carried by the loops, and a row that has finished is masked, not branched
on. On a GPU a large vocabulary gets one row per program; small vocabularies pack rows into a tile.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import triton
import triton.language as tl

# Elements per tile on a GPU (ROWS x BLOCK): a vocabulary >= this gets one row per program.
GPU_TILE = 2048
# The interpreter runs each tile operation as one numpy call: its cost is per operation, not per element,
# so there a tile spans whole rows, and as many rows as fit in this many elements.
INTERPRETER_TILE = 1 << 17


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run in Triton's numpy interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_shape(rows: int, vocab: int, tile: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """(ROWS, BLOCK), both powers of two: rows per program and vocabulary entries per sweep step.

    ``tile`` overrides the choice (tests of multi-program and multi-block sweeps).
    """
    if tile is not None:
        if any(n < 1 or n & (n - 1) for n in tile):
            raise ValueError(f"tile sizes must be powers of two, got {tile}")
        return tile
    budget = INTERPRETER_TILE if interpreting() else GPU_TILE
    block = min(triton.next_power_of_2(max(vocab, 1)), budget)
    return min(max(budget // block, 1), triton.next_power_of_2(max(rows, 1))), block


@triton.jit
def float_key(x):
    """An int32 whose signed order is float32 ``x``'s order (-0.0 just below +0.0), so a bisection over
    keys compares exactly and ends on a value that occurs in the row."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def race_update(best, best_index, ratio, start, mask):
    """Fold a [ROWS, BLOCK] block into each row's running argmax of ``ratio`` (first maximum wins, as torch)."""
    block_best, block_index = tl.max(tl.where(mask, ratio, -1.0), axis=1, return_indices=True)
    better = block_best > best
    return tl.where(better, block_best, best), tl.where(better, block_index + start, best_index)


@triton.jit
def race_rows(dist_rows, noise_rows, row_mask, V, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, the token ``argmax(dist / noise)``: a draw from ``dist`` given Exp(1) ``noise`` (the exponential
    race, which is what torch.multinomial computes for one sample). ``*_rows`` are [ROWS] row pointers."""
    best = tl.full([ROWS], -1.0, tl.float32)
    best_index = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (offsets < V)[None, :]
        dist = tl.load(dist_rows[:, None] + offsets[None, :], mask=mask, other=0.0)
        noise = tl.load(noise_rows[:, None] + offsets[None, :], mask=mask, other=1.0)
        best, best_index = race_update(best, best_index, dist / noise, start, mask)
    return best_index


@triton.jit
def argmax_rows_kernel(x_ptr, out_ptr, R, V, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out[r] = argmax(x[r, :]) (first maximum) for a contiguous [R, V] float32 tensor."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_ok = rows < R
    best = tl.full([ROWS], float("-inf"), tl.float32)
    best_index = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (offsets < V)[None, :]
        x = tl.load(x_ptr + rows[:, None] * V + offsets[None, :], mask=mask, other=float("-inf"))
        block_best, block_index = tl.max(x, axis=1, return_indices=True)
        better = block_best > best
        best = tl.where(better, block_best, best)
        best_index = tl.where(better, block_index + start, best_index)
    tl.store(out_ptr + rows, best_index, mask=row_ok)


def launch_argmax_rows(x, out, tile: Optional[Tuple[int, int]] = None) -> None:
    """Fill ``out`` [R] int32 with the row argmax of contiguous float32 ``x`` [R, V]."""
    rows, vocab = x.shape
    tile_rows, block = tile_shape(rows, vocab, tile)
    argmax_rows_kernel[(triton.cdiv(rows, tile_rows),)](x, out, rows, vocab, ROWS=tile_rows, BLOCK=block)

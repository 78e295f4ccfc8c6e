"""Block arithmetic shared by the forward and backward Pallas kernels: which key (or query) blocks a block must
visit, the edge-block mask, base-2 logits, segment-id ranges, key windows and the cost estimate.

Segment ids (packed rows) reach a kernel as two things: the ids themselves, q [Lq, 1] and k [1, Lk] per row,
for the element mask; and a range table per stream, [B, 2·blocks] int32 holding (min, max) of the ids of each
block, so a cell can skip a block whose range does not overlap its own without loading it. Overlapping ranges
are necessary for any visible pair, so skipping is exact for any ids and skips every masked block when ids are
non-decreasing along the sequence, as packing lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LOG2_E = math.log2(math.e)
MASK_VALUE = -1e30
PAD_SEGMENT = -1


class KeyWindow(NamedTuple):
    """The visible key range of one batch row in a cached pass (queries over a K/V cache): query r sits at key
    position `offset + r` and sees keys s with first <= s <= offset + r (and s below the key length).
    Both are non-negative int32 scalars."""

    offset: jax.Array
    first: jax.Array


def div(a: jax.Array, b: int) -> jax.Array:
    """Division of a non-negative traced int by a positive constant (truncating, so no sign op for Mosaic)."""
    return jax.lax.div(a, jnp.int32(b))


def cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceiling division of a non-negative traced int by a positive constant."""
    return div(a + (b - 1), b)


def key_block_range(
    q_start: jax.Array, q_len: jax.Array, k_len: jax.Array, causal: bool, block_q: int, block_k: int
) -> tuple[jax.Array, jax.Array]:
    """Key blocks a query block must visit: [0, full) need no mask, [full, end) need one; the rest are empty."""
    end = cdiv(k_len, block_k)
    full = div(k_len, block_k)
    if causal:
        end = jnp.minimum(end, cdiv(q_start + block_q, block_k))
        full = jnp.minimum(full, div(q_start + 1, block_k))
    end = jnp.where(q_start < q_len, end, 0)
    return jnp.minimum(full, end), end


def window_block_range(
    q_start: jax.Array, q_len: jax.Array, k_len: jax.Array, window: KeyWindow, block_q: int, block_k: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Key blocks a query block of a cached pass must visit, (first, plain_lo, plain_hi, end): [first, plain_lo)
    and [plain_hi, end) need a mask, [plain_lo, plain_hi) need none; blocks outside [first, end) are empty."""
    last_query = window.offset + jnp.minimum(q_start + block_q, q_len) - 1
    end = jnp.minimum(cdiv(k_len, block_k), div(last_query, block_k) + 1)
    end = jnp.where(q_start < q_len, end, 0)
    full = jnp.minimum(div(k_len, block_k), div(window.offset + q_start + 1, block_k))
    first = jnp.minimum(div(window.first, block_k), end)
    plain_lo = jnp.clip(cdiv(window.first, block_k), first, end)
    return first, plain_lo, jnp.clip(full, plain_lo, end), end


def query_block_range(
    k_start: jax.Array, q_len: jax.Array, k_len: jax.Array, causal: bool, block_q: int, block_k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Query blocks a key block must visit: [lo, mid) need a mask, [mid, end) need none; the rest are empty."""
    end = cdiv(q_len, block_q)
    lo = div(k_start, block_q) if causal else 0
    mid = cdiv(k_start + block_k - 1, block_q) if causal else 0
    mid = jnp.where(k_start + block_k <= k_len, mid, end)
    lo = jnp.where(k_start < k_len, jnp.minimum(lo, end), end)
    return lo, jnp.clip(mid, lo, end), end


def block_mask(
    q_start: jax.Array, k_start: jax.Array, k_len: jax.Array, causal: bool, block_q: int, block_k: int,
    segments: tuple[jax.Array, jax.Array] | None = None, window: KeyWindow | None = None,
) -> jax.Array:
    """[block_q, block_k] bool: key valid (below k_len), if causal not after the query, if `segments`
    (q ids [block_q, 1], k ids [1, block_k]) in the query's segment, and if `window` (a causal pass over a
    cache) inside the window: query r at key position window.offset + q_start + r, no key before window.first."""
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    mask = k_pos < k_len
    if causal:
        offset = q_start if window is None else window.offset + q_start
        q_pos = offset + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        mask = mask & (k_pos <= q_pos)
    if window is not None:
        mask = mask & (k_pos >= window.first)
    if segments is not None:
        q_seg, k_seg = segments
        mask = mask & (q_seg == k_seg)
    return mask


def ranges_overlap(ranges_a, block_a: jax.Array, ranges_b, block_b: jax.Array, batch: jax.Array) -> jax.Array:
    """Whether block `block_a` of one range table and block `block_b` of another may share a segment id."""
    lo_a, hi_a = ranges_a[batch, 2 * block_a], ranges_a[batch, 2 * block_a + 1]
    lo_b, hi_b = ranges_b[batch, 2 * block_b], ranges_b[batch, 2 * block_b + 1]
    return (lo_a <= hi_b) & (lo_b <= hi_a)


def segment_ranges(segments: jax.Array, block: int) -> jax.Array:
    """Segment ids [B, L] (L a multiple of block) -> [B, 2·(L/block)] int32: (min, max) of each block."""
    batch, length = segments.shape
    blocks = segments.reshape(batch, length // block, block)
    return jnp.stack([blocks.min(axis=-1), blocks.max(axis=-1)], axis=-1).reshape(batch, -1).astype(jnp.int32)


def scaled_logits(q: jax.Array, k: jax.Array, scale_log2: float) -> jax.Array:
    """q [bq, D] · k [bk, D]^T in f32, times scale·log2(e) (logits in base 2)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * scale_log2


def attention_cost(
    batch: int, heads: int, q_len: int, key_lens: Sequence[int], causal: Sequence[bool], head_dim: int,
    passes: int, bytes_accessed: int,
) -> pl.CostEstimate:
    """Cost of `passes` matmul pairs per visible (query, key) pair; causal sources count half the square."""
    pairs = sum(q_len * k / (2 if c else 1) for k, c in zip(key_lens, causal))
    flops = int(2 * passes * batch * heads * pairs * head_dim)
    return pl.CostEstimate(flops=flops, transcendentals=int(batch * heads * pairs), bytes_accessed=bytes_accessed)

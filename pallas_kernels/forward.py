"""Forward Pallas kernel: flash attention over one or two key sources with an online base-2 softmax in f32.

One grid cell = (batch row, query head, query block). The cell walks the key blocks of each source in turn
(reasoner keys, then generator keys for the generator pass), carrying the running max, denominator and output
accumulator, so the two sources are never concatenated in memory. Key blocks that are fully masked (causal
upper triangle, padding past the valid length) are outside the loop bounds and never loaded; blocks that are
fully visible run without a mask; only edge blocks apply one. With segment ids every visited block is masked
and a block whose id range misses the query block's is skipped (`pallas_kernels.block_math`). A windowed call
(queries over a K/V cache, `block_math.KeyWindow` per row) loops over the blocks of its key window only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_math import (
    LOG2_E, MASK_VALUE, KeyWindow, attention_cost, block_mask, div, key_block_range, ranges_overlap, scaled_logits,
    window_block_range,
)
from pallas_kernels.blocks import BlockSizes, Platform, StreamSegments, compiler_params, lengths_spec


def online_softmax_step(
    carry: tuple[jax.Array, jax.Array, jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
    mask: jax.Array | None, scale_log2: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one key block into (running max [bq,1], denominator [bq,1], accumulator [bq,D])."""
    m_prev, l_prev, acc_prev = carry
    s = scaled_logits(q, k, scale_log2)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp2(s - m_new)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp2(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc_prev + pv


def _attend_source(
    carry: tuple[jax.Array, jax.Array, jax.Array], q: jax.Array, q_start: jax.Array, q_len: jax.Array,
    k_ref, v_ref, k_len: jax.Array, causal: bool, blocks: BlockSizes, scale_log2: float, segments,
    window: KeyWindow | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold every non-empty key block of one source into the carry: unmasked blocks first, then edge blocks
    (with a window: the edge block at its start, the unmasked blocks, the edge blocks at its end).

    segments: None, or (q ids [bq, 1], q range table, k ids ref [1, Lk], k range table, batch, query block).
    """
    bq, bk = blocks.block_q, blocks.block_k

    def body(j, carry, masked):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        ids = None if segments is None else (segments[0], segments[2][:, pl.ds(k_start, bk)])
        mask = block_mask(q_start, k_start, k_len, causal, bq, bk, ids, window) if masked else None
        return online_softmax_step(carry, q, k, v, mask, scale_log2)

    if window is not None:
        first, plain_lo, plain_hi, end = window_block_range(q_start, q_len, k_len, window, bq, bk)
        carry = jax.lax.fori_loop(first, plain_lo, functools.partial(body, masked=True), carry)
        carry = jax.lax.fori_loop(plain_lo, plain_hi, functools.partial(body, masked=False), carry)
        return jax.lax.fori_loop(plain_hi, end, functools.partial(body, masked=True), carry)
    full, end = key_block_range(q_start, q_len, k_len, causal, bq, bk)
    if segments is None:
        carry = jax.lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
        return jax.lax.fori_loop(full, end, functools.partial(body, masked=True), carry)
    _, q_ranges, _, k_ranges, batch, q_block = segments

    def segmented_body(j, carry):
        visible = ranges_overlap(q_ranges, q_block, k_ranges, j, batch)
        return jax.lax.cond(visible, lambda c: body(j, c, masked=True), lambda c: c, carry)

    return jax.lax.fori_loop(0, end, segmented_body, carry)


def read_window(lens_ref, num_sources: int, batch: jax.Array) -> KeyWindow:
    """The key window of batch row `batch`: rows 1+S and 2+S of a windowed call's length table."""
    return KeyWindow(lens_ref[1 + num_sources, batch], lens_ref[2 + num_sources, batch])


def _forward_kernel(
    lens_ref, q_ref, *refs, causal: Sequence[bool], blocks: BlockSizes, scale: float, segmented: bool,
    windowed: bool = False,
) -> None:
    """lens_ref [1+S, B]: query length then one key length per source, then if windowed the key window's offset
    and first key (`block_math.KeyWindow`, for every source); refs = (q ids, q ranges) if segmented, then (k, v)
    per source, each followed by (k ids, k ranges) if segmented, then o, lse."""
    per_stream = 2 if segmented else 0
    q_seg_refs, refs = refs[:per_stream], refs[per_stream:]
    per_source = 2 + per_stream
    num_sources = len(causal)
    src_refs, (o_ref, lse_ref) = refs[: per_source * num_sources], refs[per_source * num_sources :]
    bq = blocks.block_q
    batch, q_block = pl.program_id(0), pl.program_id(2)
    q_start = q_block * bq
    q_len = lens_ref[0, batch]
    q = q_ref[...]
    head_dim = q.shape[-1]
    scale_log2 = scale * LOG2_E
    carry = (
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, head_dim), jnp.float32),
    )
    q_ids = q_seg_refs[0][...] if segmented else None
    window = read_window(lens_ref, num_sources, batch) if windowed else None
    for source, is_causal in enumerate(causal):
        k_ref, v_ref, *k_seg_refs = src_refs[per_source * source : per_source * (source + 1)]
        k_len = lens_ref[source + 1, batch]
        segments = (q_ids, q_seg_refs[1], k_seg_refs[0], k_seg_refs[1], batch, q_block) if segmented else None
        carry = _attend_source(
            carry, q, q_start, q_len, k_ref, v_ref, k_len, is_causal, blocks, scale_log2, segments, window
        )
    m, l, acc = carry
    has_keys = l > 0.0
    out = acc / jnp.where(has_keys, l, 1.0)
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    o_ref[...] = jnp.where(q_pos < q_len, out, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, m + jnp.log2(jnp.where(has_keys, l, 1.0)), 0.0)


def forward_call(
    lens: jax.Array, q: jax.Array, kvs: Sequence[tuple[jax.Array, jax.Array]], *, causal: Sequence[bool],
    blocks: BlockSizes, scale: float, platform: Platform,
    segments: tuple[StreamSegments, Sequence[StreamSegments]] | None = None, windowed: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q [B,H,Lq,D] and per-source k/v [B,K,Lk,D] (padded to the blocks) -> (o [B,H,Lq,D], lse [B,H,Lq,1] f32).

    segments: (query stream, one key stream per source) of padded ids and range tables, or None; windowed:
    lens carries a key window per row after the lengths (see `_forward_kernel`)."""
    batch, heads, q_len, head_dim = q.shape
    group = heads // kvs[0][0].shape[1]
    grid = (batch, heads, q_len // blocks.block_q)
    q_spec = pl.BlockSpec((None, None, blocks.block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    in_specs = [lengths_spec(platform, lens.shape), q_spec]
    operands = [lens, q]
    if segments is not None:
        q_ids, q_ranges = segments[0]
        in_specs += [pl.BlockSpec((None, blocks.block_q, 1), lambda b, h, i: (b, i, 0)),
                     lengths_spec(platform, q_ranges.shape)]
        operands += [q_ids, q_ranges]
    for source, (k, v) in enumerate(kvs):
        kv_spec = pl.BlockSpec((None, None, k.shape[2], head_dim), lambda b, h, i: (b, div(h, group), 0, 0))
        in_specs += [kv_spec, kv_spec]
        operands += [k, v]
        if segments is not None:
            k_ids, k_ranges = segments[1][source]
            in_specs += [pl.BlockSpec((None, 1, k_ids.shape[2]), lambda b, h, i: (b, 0, 0)),
                         lengths_spec(platform, k_ranges.shape)]
            operands += [k_ids, k_ranges]
    out_shape = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32),
    )
    out_specs = (q_spec, pl.BlockSpec((None, None, blocks.block_q, 1), lambda b, h, i: (b, h, i, 0)))
    io_bytes = sum(x.size * x.dtype.itemsize for x in operands) + q.size * q.dtype.itemsize + batch * heads * q_len * 4
    cost = attention_cost(
        batch, heads, q_len, [k.shape[2] for k, _ in kvs], causal, head_dim, passes=2, bytes_accessed=io_bytes
    )
    kernel = functools.partial(
        _forward_kernel, causal=tuple(causal), blocks=blocks, scale=scale, segmented=segments is not None,
        windowed=windowed,
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=compiler_params(platform, len(grid), blocks.block_q),
        cost_estimate=cost,
        interpret=platform == "interpret",
        name="joint_attention_forward",
    )(*operands)

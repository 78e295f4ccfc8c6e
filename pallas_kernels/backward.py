"""Backward Pallas kernels: dQ (one cell per query block, walking the key blocks of every source) and dK/dV
(one cell per kv head and key block, walking the query blocks of every query head in its GQA group).

Both recompute the probabilities from the saved base-2 log-sum-exp, p = exp2(q·k·scale·log2e − lse), and use
delta = rowsum(dO ∘ O). Padded query rows arrive with dO = 0, so they contribute nothing; masked-out key blocks
are outside the loop bounds exactly as in the forward pass, and with segment ids blocks whose id ranges do not
overlap are skipped the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_math import (
    LOG2_E, attention_cost, block_mask, div, key_block_range, query_block_range, ranges_overlap, scaled_logits,
)
from pallas_kernels.blocks import BlockSizes, Platform, StreamSegments, compiler_params, lengths_spec

TRANSPOSED_LHS = (((0,), (0,)), ((), ()))


def probabilities(
    q: jax.Array, k: jax.Array, lse: jax.Array, mask: jax.Array | None, scale_log2: float
) -> jax.Array:
    """p [bq, bk] f32 from the saved lse [bq, 1]; zero where masked."""
    p = jnp.exp2(scaled_logits(q, k, scale_log2) - lse)
    return p if mask is None else jnp.where(mask, p, 0.0)


def logit_grad(p: jax.Array, do: jax.Array, v: jax.Array, delta: jax.Array) -> jax.Array:
    """dS = p ∘ (dO·Vᵀ − delta), [bq, bk] f32 (without the softmax scale)."""
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p * (dp - delta)


def _dq_source(
    dq: jax.Array, q: jax.Array, do: jax.Array, lse: jax.Array, delta: jax.Array, q_start: jax.Array,
    q_len: jax.Array, k_ref, v_ref, k_len: jax.Array, causal: bool, blocks: BlockSizes, scale_log2: float,
    segments,
) -> jax.Array:
    """Accumulate dQ [bq, D] (unscaled) over the non-empty key blocks of one source; segments as in
    `pallas_kernels.forward._attend_source`."""
    bq, bk = blocks.block_q, blocks.block_k
    full, end = key_block_range(q_start, q_len, k_len, causal, bq, bk)

    def body(j, dq, masked):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        ids = None if segments is None else (segments[0], segments[2][:, pl.ds(k_start, bk)])
        mask = block_mask(q_start, k_start, k_len, causal, bq, bk, ids) if masked else None
        ds = logit_grad(probabilities(q, k, lse, mask, scale_log2), do, v, delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    if segments is None:
        dq = jax.lax.fori_loop(0, full, functools.partial(body, masked=False), dq)
        return jax.lax.fori_loop(full, end, functools.partial(body, masked=True), dq)
    _, q_ranges, _, k_ranges, batch, q_block = segments

    def segmented_body(j, dq):
        visible = ranges_overlap(q_ranges, q_block, k_ranges, j, batch)
        return jax.lax.cond(visible, lambda d: body(j, d, masked=True), lambda d: d, dq)

    return jax.lax.fori_loop(0, end, segmented_body, dq)


def _dq_kernel(
    lens_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, causal: Sequence[bool], blocks: BlockSizes, scale: float,
    segmented: bool,
) -> None:
    """refs = (q ids, q ranges) if segmented, then (k, v) per source, each followed by (k ids, k ranges) if
    segmented, then dq."""
    per_stream = 2 if segmented else 0
    q_seg_refs, refs = refs[:per_stream], refs[per_stream:]
    per_source = 2 + per_stream
    num_sources = len(causal)
    src_refs, dq_ref = refs[: per_source * num_sources], refs[per_source * num_sources]
    batch, q_block = pl.program_id(0), pl.program_id(2)
    q_start = q_block * blocks.block_q
    q_len = lens_ref[0, batch]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    dq = jnp.zeros(q.shape, jnp.float32)
    q_ids = q_seg_refs[0][...] if segmented else None
    for source, is_causal in enumerate(causal):
        k_ref, v_ref, *k_seg_refs = src_refs[per_source * source : per_source * (source + 1)]
        k_len = lens_ref[source + 1, batch]
        segments = (q_ids, q_seg_refs[1], k_seg_refs[0], k_seg_refs[1], batch, q_block) if segmented else None
        dq = _dq_source(
            dq, q, do, lse, delta, q_start, q_len, k_ref, v_ref, k_len, is_causal, blocks, scale * LOG2_E, segments,
        )
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    lens_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, causal: bool, blocks: BlockSizes,
    scale: float, segmented: bool,
) -> None:
    """q/do [G, Lq, D] and lse/delta [G, Lq, 1] of one GQA group; k/v/dk/dv [bk, D] of one kv head; refs =
    (q ids [Lq, 1], q ranges, k ids [1, bk], k ranges) if segmented, then dk, dv."""
    seg_refs, (dk_ref, dv_ref) = refs[:-2], refs[-2:]
    bq, bk = blocks.block_q, blocks.block_k
    batch, k_block = pl.program_id(0), pl.program_id(2)
    k_start = k_block * bk
    q_len, k_len = lens_ref[0, batch], lens_ref[1, batch]
    k, v = k_ref[...], v_ref[...]
    scale_log2 = scale * LOG2_E
    lo, mid, end = query_block_range(k_start, q_len, k_len, causal, bq, bk)
    if segmented:
        q_ids_ref, q_ranges, k_ids_ref, k_ranges = seg_refs
        k_ids = k_ids_ref[...]

    def body(i, grads, head, masked):
        dk, dv = grads
        q_start = pl.multiple_of(i * bq, bq)
        rows = pl.ds(q_start, bq)
        q, do = q_ref[head, rows, :], do_ref[head, rows, :]
        lse, delta = lse_ref[head, rows, :], delta_ref[head, rows, :]
        ids = (q_ids_ref[rows, :], k_ids) if segmented else None
        mask = block_mask(q_start, k_start, k_len, causal, bq, bk, ids) if masked else None
        p = probabilities(q, k, lse, mask, scale_log2)
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, TRANSPOSED_LHS, preferred_element_type=jnp.float32)
        ds = logit_grad(p, do, v, delta)
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, TRANSPOSED_LHS, preferred_element_type=jnp.float32)
        return dk, dv

    def segmented_body(i, grads, head):
        visible = ranges_overlap(q_ranges, i, k_ranges, k_block, batch)
        return jax.lax.cond(visible, lambda g: body(i, g, head=head, masked=True), lambda g: g, grads)

    def per_head(head, grads):
        if segmented:
            return jax.lax.fori_loop(lo, end, functools.partial(segmented_body, head=head), grads)
        grads = jax.lax.fori_loop(lo, mid, functools.partial(body, head=head, masked=True), grads)
        return jax.lax.fori_loop(mid, end, functools.partial(body, head=head, masked=False), grads)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0], per_head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def dq_call(
    lens: jax.Array, q: jax.Array, do: jax.Array, lse: jax.Array, delta: jax.Array,
    kvs: Sequence[tuple[jax.Array, jax.Array]], *, causal: Sequence[bool], blocks: BlockSizes, scale: float,
    platform: Platform, segments: tuple[StreamSegments, Sequence[StreamSegments]] | None = None,
) -> jax.Array:
    """dQ [B,H,Lq,D] for q/do [B,H,Lq,D], lse/delta [B,H,Lq,1] f32 and per-source k/v [B,K,Lk,D] (all padded);
    segments as in `pallas_kernels.forward.forward_call`."""
    batch, heads, q_len, head_dim = q.shape
    group = heads // kvs[0][0].shape[1]
    grid = (batch, heads, q_len // blocks.block_q)
    q_spec = pl.BlockSpec((None, None, blocks.block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, blocks.block_q, 1), lambda b, h, i: (b, h, i, 0))
    in_specs = [lengths_spec(platform, lens.shape), q_spec, q_spec, row_spec, row_spec]
    operands = [lens, q, do, lse, delta]
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
    io_bytes = sum(x.size * x.dtype.itemsize for x in operands) + q.size * q.dtype.itemsize
    cost = attention_cost(
        batch, heads, q_len, [k.shape[2] for k, _ in kvs], causal, head_dim, passes=3, bytes_accessed=io_bytes
    )
    kernel = functools.partial(
        _dq_kernel, causal=tuple(causal), blocks=blocks, scale=scale, segmented=segments is not None
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=q_spec,
        compiler_params=compiler_params(platform, len(grid), blocks.block_q),
        cost_estimate=cost,
        interpret=platform == "interpret",
        name="joint_attention_dq",
    )(*operands)


def dkv_call(
    lens: jax.Array, q: jax.Array, do: jax.Array, lse: jax.Array, delta: jax.Array, k: jax.Array, v: jax.Array,
    *, causal: bool, blocks: BlockSizes, scale: float, platform: Platform,
    segments: tuple[StreamSegments, StreamSegments] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(dK, dV) [B,K,Lk,D] of one key source; lens [2, B] = (query length, key length) per row; segments =
    (query stream, this source's key stream) or None."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    grid = (batch, kv_heads, k_len // blocks.block_k)
    group_spec = pl.BlockSpec((None, group, q_len, head_dim), lambda b, g, j: (b, g, 0, 0))
    group_row_spec = pl.BlockSpec((None, group, q_len, 1), lambda b, g, j: (b, g, 0, 0))
    kv_spec = pl.BlockSpec((None, None, blocks.block_k, head_dim), lambda b, g, j: (b, g, j, 0))
    in_specs = [
        lengths_spec(platform, lens.shape), group_spec, group_spec, group_row_spec, group_row_spec, kv_spec, kv_spec,
    ]
    operands = [lens, q, do, lse, delta, k, v]
    if segments is not None:
        (q_ids, q_ranges), (k_ids, k_ranges) = segments
        in_specs += [
            pl.BlockSpec((None, q_len, 1), lambda b, g, j: (b, 0, 0)), lengths_spec(platform, q_ranges.shape),
            pl.BlockSpec((None, 1, blocks.block_k), lambda b, g, j: (b, 0, j)), lengths_spec(platform, k_ranges.shape),
        ]
        operands += [q_ids, q_ranges, k_ids, k_ranges]
    io_bytes = sum(x.size * x.dtype.itemsize for x in operands) + 2 * k.size * k.dtype.itemsize
    cost = attention_cost(batch, heads, q_len, [k_len], [causal], head_dim, passes=4, bytes_accessed=io_bytes)
    kernel = functools.partial(_dkv_kernel, causal=causal, blocks=blocks, scale=scale, segmented=segments is not None)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=grid,
        in_specs=in_specs,
        out_specs=(kv_spec, kv_spec),
        compiler_params=compiler_params(platform, len(grid), blocks.block_q),
        cost_estimate=cost,
        interpret=platform == "interpret",
        name="joint_attention_dkv",
    )(*operands)

"""Backward Pallas kernels with sequential grid axes: the TPU layout, whose cells hold one block per operand.

dQ: grid (batch row, query head, query block, key step), the key step walking every source's key blocks as in
`pallas_kernels.forward_grid`, dQ accumulated in f32 scratch. dK/dV: grid (batch row, kv head, key block, group
step), the group step walking (query head of the GQA group, query block), dK and dV accumulated in f32 scratch.
Fully masked steps do no compute, exactly as in the forward pass. The arithmetic is that of
`pallas_kernels.backward`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backward import TRANSPOSED_LHS, logit_grad, probabilities
from pallas_kernels.block_math import LOG2_E, attention_cost, block_mask, query_block_range, ranges_overlap
from pallas_kernels.blocks import BlockSizes, Platform, StreamSegments, compiler_params, lengths_spec
from pallas_kernels.forward_grid import key_specs, key_step_visibility, query_segment_specs
from pallas_kernels.key_grid import first_causal_query_block, source_offsets, split_group_step


def _dq_grid_kernel(
    lens_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, causal: Sequence[bool], counts: Sequence[int],
    blocks: BlockSizes, scale: float, segmented: bool,
) -> None:
    """refs = (q ids, q ranges) if segmented, then (k, v) blocks per source, each followed by (k ids block,
    k ranges) if segmented, then dq, then the dq scratch."""
    per_stream = 2 if segmented else 0
    q_seg_refs, refs = refs[:per_stream], refs[per_stream:]
    per_source = 2 + per_stream
    src_refs, (dq_ref, acc_ref) = refs[: per_source * len(causal)], refs[per_source * len(causal):]
    bq, bk = blocks.block_q, blocks.block_k
    batch, q_block, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_start = q_block * bq
    scale_log2 = scale * LOG2_E

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    for source, (is_causal, count, offset) in enumerate(zip(causal, counts, source_offsets(counts))):
        k_ref, v_ref, *k_seg_refs = src_refs[per_source * source : per_source * (source + 1)]
        local = step - offset
        seg_refs = (q_seg_refs[1], k_seg_refs[1]) if segmented else None
        plain, edge = key_step_visibility(
            lens_ref, seg_refs, source, local, q_start, q_block, batch, is_causal, count, blocks
        )

        def fold(masked: bool, k_ref=k_ref, v_ref=v_ref, k_seg_refs=k_seg_refs, k_start=local * bk, source=source,
                 is_causal=is_causal) -> None:
            ids = (q_seg_refs[0][...], k_seg_refs[0][...]) if segmented else None
            k_len = lens_ref[source + 1, batch]
            mask = block_mask(q_start, k_start, k_len, is_causal, bq, bk, ids) if masked else None
            k = k_ref[...]
            p = probabilities(q_ref[...], k, lse_ref[...], mask, scale_log2)
            ds = logit_grad(p, do_ref[...], v_ref[...], delta_ref[...])
            acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

        if plain is not None:
            pl.when(plain)(functools.partial(fold, False))
        pl.when(edge)(functools.partial(fold, True))

    @pl.when(step == sum(counts) - 1)
    def _write():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_grid_kernel(
    lens_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, causal: bool, query_blocks: int,
    group: int, blocks: BlockSizes, scale: float, segmented: bool,
) -> None:
    """q/do [bq, D], lse/delta [bq, 1], k/v [bk, D] blocks; refs = (q ids [bq, 1], q ranges, k ids [1, bk],
    k ranges) if segmented, then dk, dv, then the dk, dv scratch."""
    seg_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = refs[:-4], refs[-4:]
    bq, bk = blocks.block_q, blocks.block_k
    batch, k_block, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    _, q_block = split_group_step(step, query_blocks)
    k_start, q_start = k_block * bk, q_block * bq
    q_len, k_len = lens_ref[0, batch], lens_ref[1, batch]
    lo, mid, end = query_block_range(k_start, q_len, k_len, causal, bq, bk)
    visible = (q_block >= lo) & (q_block < end)
    if segmented:
        q_ids_ref, q_ranges, k_ids_ref, k_ranges = seg_refs
        visible = visible & ranges_overlap(q_ranges, q_block, k_ranges, k_block, batch)
        plain, edge = None, visible
    else:
        plain, edge = visible & (q_block >= mid), visible & (q_block < mid)

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def fold(masked: bool) -> None:
        ids = (q_ids_ref[...], k_ids_ref[...]) if segmented else None
        mask = block_mask(q_start, k_start, k_len, causal, bq, bk, ids) if masked else None
        q, do = q_ref[...], do_ref[...]
        p = probabilities(q, k_ref[...], lse_ref[...], mask, scale * LOG2_E)
        dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, TRANSPOSED_LHS, preferred_element_type=jnp.float32)
        ds = logit_grad(p, do, v_ref[...], delta_ref[...])
        dk_acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, TRANSPOSED_LHS, preferred_element_type=jnp.float32)

    if plain is not None:
        pl.when(plain)(functools.partial(fold, False))
    pl.when(edge)(functools.partial(fold, True))

    @pl.when(step == group * query_blocks - 1)
    def _write():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def dq_grid_call(
    lens: jax.Array, q: jax.Array, do: jax.Array, lse: jax.Array, delta: jax.Array,
    kvs: Sequence[tuple[jax.Array, jax.Array]], *, causal: Sequence[bool], blocks: BlockSizes, scale: float,
    platform: Platform, segments: tuple[StreamSegments, Sequence[StreamSegments]] | None = None,
) -> jax.Array:
    """dQ [B,H,Lq,D]; arguments as in `pallas_kernels.backward.dq_call`."""
    batch, heads, q_len, head_dim = q.shape
    group = heads // kvs[0][0].shape[1]
    q_spec = pl.BlockSpec((None, None, blocks.block_q, head_dim), lambda b, h, i, j: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, blocks.block_q, 1), lambda b, h, i, j: (b, h, i, 0))
    seg_specs, seg_operands = query_segment_specs(platform, segments, blocks)
    kv_specs, kv_operands, counts = key_specs(platform, kvs, segments, causal, blocks, group)
    in_specs = [lengths_spec(platform, lens.shape), q_spec, q_spec, row_spec, row_spec, *seg_specs, *kv_specs]
    operands = [lens, q, do, lse, delta, *seg_operands, *kv_operands]
    grid = (batch, heads, q_len // blocks.block_q, sum(counts))
    io_bytes = sum(x.size * x.dtype.itemsize for x in operands) + q.size * q.dtype.itemsize
    cost = attention_cost(
        batch, heads, q_len, [k.shape[2] for k, _ in kvs], causal, head_dim, passes=3, bytes_accessed=io_bytes
    )
    kernel = functools.partial(
        _dq_grid_kernel, causal=tuple(causal), counts=counts, blocks=blocks, scale=scale,
        segmented=segments is not None,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((blocks.block_q, head_dim), jnp.float32)],
        compiler_params=compiler_params(platform, len(grid), blocks.block_q, sequential=1),
        cost_estimate=cost,
        interpret=platform == "interpret",
        name="joint_attention_dq_key_grid",
    )(*operands)


def dkv_grid_call(
    lens: jax.Array, q: jax.Array, do: jax.Array, lse: jax.Array, delta: jax.Array, k: jax.Array, v: jax.Array,
    *, causal: bool, blocks: BlockSizes, scale: float, platform: Platform,
    segments: tuple[StreamSegments, StreamSegments] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(dK, dV) [B,K,Lk,D] of one key source; arguments as in `pallas_kernels.backward.dkv_call`."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    query_blocks = q_len // blocks.block_q

    def query_index(j, t):
        head, i = split_group_step(t, query_blocks)
        if causal:
            i = jnp.maximum(i, first_causal_query_block(j, blocks.block_q, blocks.block_k))
        return head, i

    def q_map(b, g, j, t):
        head, i = query_index(j, t)
        return b, g * group + head, i, 0

    q_spec = pl.BlockSpec((None, None, blocks.block_q, head_dim), q_map)
    row_spec = pl.BlockSpec((None, None, blocks.block_q, 1), q_map)
    kv_spec = pl.BlockSpec((None, None, blocks.block_k, head_dim), lambda b, g, j, t: (b, g, j, 0))
    in_specs = [lengths_spec(platform, lens.shape), q_spec, q_spec, row_spec, row_spec, kv_spec, kv_spec]
    operands = [lens, q, do, lse, delta, k, v]
    if segments is not None:
        (q_ids, q_ranges), (k_ids, k_ranges) = segments
        in_specs += [
            pl.BlockSpec((None, blocks.block_q, 1), lambda b, g, j, t: (b, query_index(j, t)[1], 0)),
            lengths_spec(platform, q_ranges.shape),
            pl.BlockSpec((None, 1, blocks.block_k), lambda b, g, j, t: (b, 0, j)),
            lengths_spec(platform, k_ranges.shape),
        ]
        operands += [q_ids, q_ranges, k_ids, k_ranges]
    grid = (batch, kv_heads, k_len // blocks.block_k, group * query_blocks)
    io_bytes = sum(x.size * x.dtype.itemsize for x in operands) + 2 * k.size * k.dtype.itemsize
    cost = attention_cost(batch, heads, q_len, [k_len], [causal], head_dim, passes=4, bytes_accessed=io_bytes)
    kernel = functools.partial(
        _dkv_grid_kernel, causal=causal, query_blocks=query_blocks, group=group, blocks=blocks, scale=scale,
        segmented=segments is not None,
    )
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=grid,
        in_specs=in_specs,
        out_specs=(kv_spec, kv_spec),
        scratch_shapes=[pltpu.VMEM((blocks.block_k, head_dim), jnp.float32)] * 2,
        compiler_params=compiler_params(platform, len(grid), blocks.block_q, sequential=1),
        cost_estimate=cost,
        interpret=platform == "interpret",
        name="joint_attention_dkv_key_grid",
    )(*operands)

"""Forward Pallas kernel with a key-block grid axis: the layout for TPU, where a cell's blocks must fit VMEM.

Grid = (batch row, query head, query block, key step); the key step is 'arbitrary' and walks the key blocks of
every source in turn (`pallas_kernels.key_grid`). Each cell holds one query block and one key/value block per
source, so VMEM use does not grow with the sequence. The running max, denominator and output accumulator live
in f32 scratch: set on the first key step, folded on every visible one, and normalised into the output on the
last. A step whose key block is fully masked (causal upper triangle, past the valid length, or, with segment ids,
a block whose id range misses the query block's) does no compute; fully visible blocks run without a mask.
Semantics and outputs are those of `pallas_kernels.forward.forward_call`. A windowed call (queries over a K/V
cache) does no compute outside each row's key window, but its index maps cannot read the per-row window, so
they do not clamp to the diagonal: every key block of the cache is fetched.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_math import (
    LOG2_E, MASK_VALUE, KeyWindow, attention_cost, block_mask, div, key_block_range, ranges_overlap,
    window_block_range,
)
from pallas_kernels.blocks import BlockSizes, Platform, StreamSegments, compiler_params, lengths_spec
from pallas_kernels.forward import online_softmax_step, read_window
from pallas_kernels.key_grid import last_causal_block, source_block, source_offsets


def key_step_visibility(
    lens_ref, seg_refs, source: int, local: jax.Array, q_start: jax.Array, q_block: jax.Array, batch: jax.Array,
    causal: bool, count: int, blocks: BlockSizes, window: KeyWindow | None = None,
) -> tuple[jax.Array | None, jax.Array]:
    """(visible without a mask, visible with a mask) for block `local` of key source `source` (local may be out
    of the source's range: then neither). seg_refs = (q ranges, k ranges) or None; with segment ids every
    visible block is masked, so the first is None. window: the row's key window of a cached pass, or None."""
    q_len, k_len = lens_ref[0, batch], lens_ref[source + 1, batch]
    if window is not None:
        first, plain_lo, plain_hi, end = window_block_range(q_start, q_len, k_len, window, blocks.block_q,
                                                            blocks.block_k)
        plain = (local >= plain_lo) & (local < plain_hi)
        return plain, (local >= first) & (local < end) & ~plain
    full, end = key_block_range(q_start, q_len, k_len, causal, blocks.block_q, blocks.block_k)
    visible = (local >= 0) & (local < end)
    if seg_refs is None:
        return visible & (local < full), visible & (local >= full)
    q_ranges, k_ranges = seg_refs
    visible = visible & ranges_overlap(q_ranges, q_block, k_ranges, jnp.clip(local, 0, count - 1), batch)
    return None, visible


def _forward_grid_kernel(
    lens_ref, q_ref, *refs, causal: Sequence[bool], counts: Sequence[int], blocks: BlockSizes, scale: float,
    segmented: bool, windowed: bool = False,
) -> None:
    """refs = (q ids, q ranges) if segmented, then (k, v) blocks per source, each followed by (k ids block,
    k ranges) if segmented, then o, lse, then the m, l, acc scratch; lens_ref as in
    `pallas_kernels.forward._forward_kernel`."""
    per_stream = 2 if segmented else 0
    q_seg_refs, refs = refs[:per_stream], refs[per_stream:]
    per_source = 2 + per_stream
    num_refs = per_source * len(causal)
    src_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[:num_refs], refs[num_refs:]
    bq, bk = blocks.block_q, blocks.block_k
    batch, q_block, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_start = q_block * bq
    scale_log2 = scale * LOG2_E
    window = read_window(lens_ref, len(causal), batch) if windowed else None

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    for source, (is_causal, count, offset) in enumerate(zip(causal, counts, source_offsets(counts))):
        k_ref, v_ref, *k_seg_refs = src_refs[per_source * source : per_source * (source + 1)]
        local = step - offset
        k_start = local * bk
        seg_refs = (q_seg_refs[1], k_seg_refs[1]) if segmented else None
        plain, edge = key_step_visibility(
            lens_ref, seg_refs, source, local, q_start, q_block, batch, is_causal, count, blocks, window
        )

        def fold(masked: bool, k_ref=k_ref, v_ref=v_ref, k_seg_refs=k_seg_refs, k_start=k_start, source=source,
                 is_causal=is_causal) -> None:
            ids = (q_seg_refs[0][...], k_seg_refs[0][...]) if segmented else None
            k_len = lens_ref[source + 1, batch]
            mask = block_mask(q_start, k_start, k_len, is_causal, bq, bk, ids, window) if masked else None
            carry = (m_ref[...], l_ref[...], acc_ref[...])
            m_ref[...], l_ref[...], acc_ref[...] = online_softmax_step(
                carry, q_ref[...], k_ref[...], v_ref[...], mask, scale_log2
            )

        if plain is not None:
            pl.when(plain)(functools.partial(fold, False))
        pl.when(edge)(functools.partial(fold, True))

    @pl.when(step == sum(counts) - 1)
    def _write():
        m, l, acc = m_ref[...], l_ref[...], acc_ref[...]
        q_len = lens_ref[0, batch]
        has_keys = l > 0.0
        out = acc / jnp.where(has_keys, l, 1.0)
        q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        o_ref[...] = jnp.where(q_pos < q_len, out, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_keys, m + jnp.log2(jnp.where(has_keys, l, 1.0)), 0.0)


def key_block_index(source_step, causal: bool, blocks: BlockSizes):
    """Index-map helper: (query block, key step) -> this source's key block, clamped to the diagonal if causal."""
    if not causal:
        return source_step
    return lambda i, j: jnp.minimum(source_step(i, j), last_causal_block(i, blocks.block_q, blocks.block_k))


def key_specs(
    platform: Platform, kvs: Sequence[tuple[jax.Array, jax.Array]], segments, causal: Sequence[bool],
    blocks: BlockSizes, group: int,
) -> tuple[list[pl.BlockSpec], list[jax.Array], tuple[int, ...]]:
    """(in_specs, operands, key blocks per source) of the key sources on a (b, h, i, j) grid."""
    counts = tuple(k.shape[2] // blocks.block_k for k, _ in kvs)
    head_dim = kvs[0][0].shape[-1]
    specs, operands = [], []
    for source, ((k, v), offset) in enumerate(zip(kvs, source_offsets(counts))):
        block = key_block_index(
            lambda i, j, offset=offset, count=counts[source]: source_block(j, offset, count), causal[source], blocks
        )
        kv_spec = pl.BlockSpec((None, None, blocks.block_k, head_dim),
                               lambda b, h, i, j, block=block: (b, div(h, group), block(i, j), 0))
        specs += [kv_spec, kv_spec]
        operands += [k, v]
        if segments is not None:
            k_ids, k_ranges = segments[1][source]
            specs += [pl.BlockSpec((None, 1, blocks.block_k), lambda b, h, i, j, block=block: (b, 0, block(i, j))),
                      lengths_spec(platform, k_ranges.shape)]
            operands += [k_ids, k_ranges]
    return specs, operands, counts


def query_segment_specs(platform: Platform, segments, blocks: BlockSizes) -> tuple[list[pl.BlockSpec], list[jax.Array]]:
    """(in_specs, operands) of the query stream's segment ids on a (b, h, i, j) grid; empty without segments."""
    if segments is None:
        return [], []
    q_ids, q_ranges = segments[0]
    return ([pl.BlockSpec((None, blocks.block_q, 1), lambda b, h, i, j: (b, i, 0)),
             lengths_spec(platform, q_ranges.shape)], [q_ids, q_ranges])


def forward_grid_call(
    lens: jax.Array, q: jax.Array, kvs: Sequence[tuple[jax.Array, jax.Array]], *, causal: Sequence[bool],
    blocks: BlockSizes, scale: float, platform: Platform,
    segments: tuple[StreamSegments, Sequence[StreamSegments]] | None = None, windowed: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q [B,H,Lq,D] and per-source k/v [B,K,Lk,D] (padded to the blocks) -> (o [B,H,Lq,D], lse [B,H,Lq,1] f32);
    segments and windowed as in `pallas_kernels.forward.forward_call`."""
    batch, heads, q_len, head_dim = q.shape
    group = heads // kvs[0][0].shape[1]
    q_spec = pl.BlockSpec((None, None, blocks.block_q, head_dim), lambda b, h, i, j: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, blocks.block_q, 1), lambda b, h, i, j: (b, h, i, 0))
    seg_specs, seg_operands = query_segment_specs(platform, segments, blocks)
    clamped = tuple(c and not windowed for c in causal)  # a window's diagonal is per row: unknown to index maps
    kv_specs, kv_operands, counts = key_specs(platform, kvs, segments, clamped, blocks, group)
    in_specs = [lengths_spec(platform, lens.shape), q_spec, *seg_specs, *kv_specs]
    operands = [lens, q, *seg_operands, *kv_operands]
    grid = (batch, heads, q_len // blocks.block_q, sum(counts))
    io_bytes = sum(x.size * x.dtype.itemsize for x in operands) + q.size * q.dtype.itemsize + batch * heads * q_len * 4
    cost = attention_cost(
        batch, heads, q_len, [k.shape[2] for k, _ in kvs], causal, head_dim, passes=2, bytes_accessed=io_bytes
    )
    kernel = functools.partial(
        _forward_grid_kernel, causal=tuple(causal), counts=counts, blocks=blocks, scale=scale,
        segmented=segments is not None, windowed=windowed,
    )
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32)),
        grid=grid,
        in_specs=in_specs,
        out_specs=(q_spec, row_spec),
        scratch_shapes=[
            pltpu.VMEM((blocks.block_q, 1), jnp.float32),
            pltpu.VMEM((blocks.block_q, 1), jnp.float32),
            pltpu.VMEM((blocks.block_q, head_dim), jnp.float32),
        ],
        compiler_params=compiler_params(platform, len(grid), blocks.block_q, sequential=1),
        cost_estimate=cost,
        interpret=platform == "interpret",
        name="joint_attention_forward_key_grid",
    )(*operands)

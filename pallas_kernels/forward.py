"""Forward Pallas kernel: flash attention over one or two key sources with an online base-2 softmax in f32.

One grid cell = (batch row, query head, query block). The cell walks the key blocks of each source in turn
(reasoner keys, then generator keys for the generator pass), carrying the running max, denominator and output
accumulator, so the two sources are never concatenated in memory. Key blocks that are fully masked (causal
upper triangle, padding past the valid length) are outside the loop bounds and never loaded; blocks that are
fully visible run without a mask; only edge blocks apply one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.blocks import BlockSizes, Platform, compiler_params, lengths_spec

LOG2_E = math.log2(math.e)
MASK_VALUE = -1e30


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


def block_mask(
    q_start: jax.Array, k_start: jax.Array, k_len: jax.Array, causal: bool, block_q: int, block_k: int
) -> jax.Array:
    """[block_q, block_k] bool: key valid (below k_len) and, if causal, not after the query."""
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    mask = k_pos < k_len
    if causal:
        q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        mask = mask & (k_pos <= q_pos)
    return mask


def scaled_logits(q: jax.Array, k: jax.Array, scale_log2: float) -> jax.Array:
    """q [bq, D] · k [bk, D]^T in f32, times scale·log2(e) (logits in base 2)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * scale_log2


def _online_softmax_step(
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
    k_ref, v_ref, k_len: jax.Array, causal: bool, blocks: BlockSizes, scale_log2: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold every non-empty key block of one source into the carry: unmasked blocks first, then edge blocks."""
    bq, bk = blocks.block_q, blocks.block_k
    full, end = key_block_range(q_start, q_len, k_len, causal, bq, bk)

    def body(j, carry, masked):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        mask = block_mask(q_start, k_start, k_len, causal, bq, bk) if masked else None
        return _online_softmax_step(carry, q, k, v, mask, scale_log2)

    carry = jax.lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(full, end, functools.partial(body, masked=True), carry)


def _forward_kernel(
    lens_ref, q_ref, *refs, causal: Sequence[bool], blocks: BlockSizes, scale: float
) -> None:
    """lens_ref [1+S, B]: query length then one key length per source; refs = (k, v) per source, o, lse."""
    num_sources = len(causal)
    kv_refs, (o_ref, lse_ref) = refs[: 2 * num_sources], refs[2 * num_sources :]
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
    for source, is_causal in enumerate(causal):
        k_ref, v_ref = kv_refs[2 * source], kv_refs[2 * source + 1]
        k_len = lens_ref[source + 1, batch]
        carry = _attend_source(carry, q, q_start, q_len, k_ref, v_ref, k_len, is_causal, blocks, scale_log2)
    m, l, acc = carry
    has_keys = l > 0.0
    out = acc / jnp.where(has_keys, l, 1.0)
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    o_ref[...] = jnp.where(q_pos < q_len, out, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, m + jnp.log2(jnp.where(has_keys, l, 1.0)), 0.0)


def attention_cost(
    batch: int, heads: int, q_len: int, key_lens: Sequence[int], causal: Sequence[bool], head_dim: int,
    passes: int, bytes_accessed: int,
) -> pl.CostEstimate:
    """Cost of `passes` matmul pairs per visible (query, key) pair; causal sources count half the square."""
    pairs = sum(q_len * k / (2 if c else 1) for k, c in zip(key_lens, causal))
    flops = int(2 * passes * batch * heads * pairs * head_dim)
    return pl.CostEstimate(flops=flops, transcendentals=int(batch * heads * pairs), bytes_accessed=bytes_accessed)


def forward_call(
    lens: jax.Array, q: jax.Array, kvs: Sequence[tuple[jax.Array, jax.Array]], *, causal: Sequence[bool],
    blocks: BlockSizes, scale: float, platform: Platform,
) -> tuple[jax.Array, jax.Array]:
    """q [B,H,Lq,D] and per-source k/v [B,K,Lk,D] (padded to the blocks) -> (o [B,H,Lq,D], lse [B,H,Lq,1] f32)."""
    batch, heads, q_len, head_dim = q.shape
    group = heads // kvs[0][0].shape[1]
    grid = (batch, heads, q_len // blocks.block_q)
    q_spec = pl.BlockSpec((None, None, blocks.block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    in_specs = [lengths_spec(platform, lens.shape), q_spec]
    operands = [lens, q]
    for k, v in kvs:
        kv_spec = pl.BlockSpec((None, None, k.shape[2], head_dim), lambda b, h, i: (b, div(h, group), 0, 0))
        in_specs += [kv_spec, kv_spec]
        operands += [k, v]
    out_shape = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32),
    )
    out_specs = (q_spec, pl.BlockSpec((None, None, blocks.block_q, 1), lambda b, h, i: (b, h, i, 0)))
    io_bytes = sum(x.size * x.dtype.itemsize for x in operands) + q.size * q.dtype.itemsize + batch * heads * q_len * 4
    cost = attention_cost(
        batch, heads, q_len, [k.shape[2] for k, _ in kvs], causal, head_dim, passes=2, bytes_accessed=io_bytes
    )
    kernel = functools.partial(_forward_kernel, causal=tuple(causal), blocks=blocks, scale=scale)
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

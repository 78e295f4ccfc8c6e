"""CPU-fast pure-XLA joint attention: key-blocked online softmax in f32, never materialising the S×S logits.

Same semantics and signatures as `pallas_kernels.reference` (and `pallas_kernels.joint_attention`). Queries of
one GQA group are stacked into the rows of a single matmul ([B, K, G·Lq, D]) so K/V are never repeated; a
`lax.scan` walks the key blocks of each source carrying the running max, denominator and accumulator. The
causal reasoner pass is tiled into query blocks (a Python loop), each scanning only the key blocks at or before
it, so the upper triangle is skipped; the generator pass maps over query tiles with `lax.map`. All arithmetic is f32 (bf16 inputs are upcast: CPU matmuls are fastest in f32). Differentiable by plain JAX
autodiff; each scan step is rematerialised in the
backward pass so the saved state is O(S·D), not O(S²).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import blocks as blk

_LOG2_E = math.log2(math.e)
_MASK_VALUE = -1e30
_DEFAULT_BLOCK_Q = 256
_DEFAULT_BLOCK_K = 256

Carry = tuple[jax.Array, jax.Array, jax.Array]


def _group_rows(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, L, H, D] -> [B, K, G·L, D] (row r of group g is query r % L of head k·G + g)."""
    batch, length, heads, head_dim = q.shape
    group = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, group, head_dim)
    return q.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * length, head_dim)


def _ungroup_rows(x: jax.Array, length: int, heads: int) -> jax.Array:
    """Inverse of `_group_rows`."""
    batch, kv_heads, _, head_dim = x.shape
    x = x.reshape(batch, kv_heads, heads // kv_heads, length, head_dim)
    return x.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def _key_blocks(x: jax.Array, num_blocks: int, block_k: int) -> jax.Array:
    """[B, Lk, K, D] -> [num_blocks, B, K, block_k, D] f32 (zero-padded), the scan's leading axis."""
    batch, _, kv_heads, head_dim = x.shape
    x = blk.pad_sequence(x[:, : num_blocks * block_k].astype(jnp.float32), num_blocks * block_k, axis=1)
    return x.reshape(batch, num_blocks, block_k, kv_heads, head_dim).transpose(1, 0, 3, 2, 4)


def _mask_bias(start: jax.Array, block_k: int, k_len: jax.Array, q_pos: jax.Array | None) -> jax.Array:
    """Additive logit bias, 0 where visible and -inf where masked: [B,1,1,bk], or [B,1,R,bk] when causal.

    The running max starts finite, so exp2(-inf - max) is exactly 0 and no second select is needed.
    """
    k_pos = start + jnp.arange(block_k)
    visible = (k_pos[None, :] < k_len[:, None])[:, None, None, :]
    if q_pos is not None:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])[None, None]
    return jnp.where(visible, 0.0, -jnp.inf)


def _scan_source(
    carry: Carry, q: jax.Array, q_pos: jax.Array | None, k: jax.Array, v: jax.Array, k_len: jax.Array,
    num_blocks: int, block_k: int,
) -> Carry:
    """Fold key blocks [0, num_blocks) of one source into the carry; q [B,K,R,D] f32 pre-scaled by
    scale·log2(e), q_pos [R] if causal."""
    k_blocks, v_blocks = _key_blocks(k, num_blocks, block_k), _key_blocks(v, num_blocks, block_k)
    starts = jnp.arange(num_blocks) * block_k

    @jax.checkpoint
    def step(carry: Carry, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[Carry, None]:
        m_prev, l_prev, acc_prev = carry
        k_blk, v_blk, start = xs
        s = jnp.einsum("bkrd,bksd->bkrs", q, k_blk)
        s = s + _mask_bias(start, block_k, k_len, q_pos)
        m_new = jax.lax.stop_gradient(jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True)))
        p = jnp.exp2(s - m_new)
        alpha = jnp.exp2(m_prev - m_new)
        pv = jnp.einsum("bkrs,bksd->bkrd", p, v_blk)
        return (m_new, alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True), alpha * acc_prev + pv), None

    carry, _ = jax.lax.scan(step, carry, (k_blocks, v_blocks, starts))
    return carry


def _init_carry(q: jax.Array) -> Carry:
    rows_shape = q.shape[:-1] + (1,)
    return (
        jnp.full(rows_shape, _MASK_VALUE, jnp.float32),
        jnp.zeros(rows_shape, jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )


def _finish(carry: Carry) -> jax.Array:
    _, l, acc = carry
    return acc / jnp.where(l > 0.0, l, 1.0)


def _zero_padded_queries(out: jax.Array, q_len: jax.Array) -> jax.Array:
    """Zero rows of out [B, L, H, D] at or past q_len [B]."""
    valid = jnp.arange(out.shape[1])[None, :] < q_len[:, None]
    return jnp.where(valid[:, :, None, None], out, 0)


def _choose(block: int | None, default: int, name: str) -> int:
    if block is None:
        return default
    blk.check_block(name, block)
    return block


def reasoner_attention(
    q_und: jax.Array,
    k_und: jax.Array,
    v_und: jax.Array,
    und_len: jax.Array,
    scale: float | None = None,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Causal attention among reasoner tokens: q [B,Lu,H,D], k/v [B,Lu,K,D], und_len [B] -> [B,Lu,H,D]."""
    blk.validate_reasoner(q_und, k_und, v_und, und_len)
    scale_log2 = blk.resolve_scale(scale, q_und.shape[-1]) * _LOG2_E
    block_q = _choose(block_q, _DEFAULT_BLOCK_Q, "block_q")
    block_k = _choose(block_k, _DEFAULT_BLOCK_K, "block_k")
    length, heads, kv_heads = q_und.shape[1], q_und.shape[2], k_und.shape[2]
    und_len = jnp.clip(und_len.astype(jnp.int32), 0, length)
    tiles = []
    for start in range(0, length, block_q):
        stop = min(start + block_q, length)
        q_tile = _group_rows(q_und[:, start:stop].astype(jnp.float32) * scale_log2, kv_heads)
        q_pos = jnp.tile(jnp.arange(start, stop), heads // kv_heads)
        num_blocks = -(-stop // block_k)
        carry = _scan_source(
            _init_carry(q_tile), q_tile, q_pos, k_und, v_und, und_len, num_blocks, block_k
        )
        tiles.append(_ungroup_rows(_finish(carry), stop - start, heads))
    out = jnp.concatenate(tiles, axis=1) if len(tiles) > 1 else tiles[0]
    return _zero_padded_queries(out, und_len).astype(q_und.dtype)


def generator_attention(
    q_gen: jax.Array,
    k_und_for_gen: jax.Array,
    v_und: jax.Array,
    k_gen: jax.Array,
    v_gen: jax.Array,
    und_len: jax.Array,
    gen_len: jax.Array,
    scale: float | None = None,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Generator queries [B,Lg,H,D] over valid reasoner keys [B,Lu,K,D] and generator keys [B,Lg,K,D]."""
    blk.validate_generator(q_gen, k_und_for_gen, v_und, k_gen, v_gen, und_len, gen_len)
    scale_log2 = blk.resolve_scale(scale, q_gen.shape[-1]) * _LOG2_E
    block_q = _choose(block_q, _DEFAULT_BLOCK_Q, "block_q")
    block_k = _choose(block_k, _DEFAULT_BLOCK_K, "block_k")
    lu, lg, heads, kv_heads = k_und_for_gen.shape[1], q_gen.shape[1], q_gen.shape[2], k_gen.shape[2]
    und_len = jnp.clip(und_len.astype(jnp.int32), 0, lu)
    gen_len = jnp.clip(gen_len.astype(jnp.int32), 0, lg)
    block_q = min(block_q, lg)
    num_tiles = -(-lg // block_q)
    q_tiles = blk.pad_sequence(q_gen, num_tiles * block_q, axis=1)
    q_tiles = q_tiles.reshape(q_gen.shape[0], num_tiles, block_q, heads, -1).swapaxes(0, 1)
    sources = ((k_und_for_gen, v_und, und_len, lu), (k_gen, v_gen, gen_len, lg))

    def attend_tile(q_tile: jax.Array) -> jax.Array:
        rows = _group_rows(q_tile.astype(jnp.float32) * scale_log2, kv_heads)
        carry = _init_carry(rows)
        for k, v, k_len, length in sources:
            carry = _scan_source(carry, rows, None, k, v, k_len, -(-length // block_k), block_k)
        return _ungroup_rows(_finish(carry), block_q, heads)

    out = jax.lax.map(attend_tile, q_tiles).swapaxes(0, 1)
    out = out.reshape(q_gen.shape[0], num_tiles * block_q, heads, -1)[:, :lg]
    return _zero_padded_queries(out, gen_len).astype(q_gen.dtype)

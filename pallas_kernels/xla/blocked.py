"""CPU-fast pure-XLA joint attention: query tiles against key chunks with an online softmax in f32.

Same semantics and signatures as `pallas_kernels.reference` (and `pallas_kernels.joint_attention`). Queries of
one GQA group are stacked into the rows of a single matmul ([B, K, G·bq, D]) so K/V are never repeated, and the
softmax scale and log2(e) are folded into the queries once, so each logit costs one `exp2`.

Generator pass: both key sources are concatenated and laid out in key chunks once per call ([C, B, K, bk, D],
with one additive validity bias per chunk), then `lax.map` walks the query tiles and a `lax.scan` folds the key
chunks into the running max, denominator and accumulator. The default chunk (4096 keys) holds every key of a
CPU-sized sequence, so the scan usually has one step and the softmax is never rescaled; small query tiles
(64 tokens, 256 rows) keep each [rows, keys] logit tile in cache. The causal reasoner pass is tiled into query
blocks (a Python loop), each scanning only the key blocks at or before it, so the upper triangle is skipped.

Segment ids (packed rows): a query sees a key only when their ids are equal (on top of the padding and causal
masks). A key chunk whose id range does not overlap the query tile's is skipped (`lax.cond`), which skips
every masked chunk when ids are non-decreasing along the sequence, as packing lays them out.

Cached pass (the reasoner alone, new queries over a left-padded K/V cache): the cache is laid out in key chunks
once, each query tile scans them with per-row causal positions, and a chunk that no query of the tile sees
(before every row's first key, after every row's last query) is skipped (`lax.cond`).

Differentiable by plain JAX autodiff; each scan step is rematerialised in the backward pass so the saved state
is O(S·D), not O(S²). All arithmetic is f32 (bf16 inputs are upcast: CPU matmuls are fastest in f32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import blocks as blk

_LOG2_E = math.log2(math.e)
_MASK_VALUE = -1e30
_DEFAULT_REASONER_BLOCK = 256
_DEFAULT_GENERATOR_BLOCK_Q = 64
_DEFAULT_GENERATOR_BLOCK_K = 4096

Carry = tuple[jax.Array, jax.Array, jax.Array]


class _Chunks(NamedTuple):
    """Keys laid out for the scan: k [C,B,K,D,bk] (transposed once, so q·k is a plain matmul) and v [C,B,K,bk,D]
    f32, bias [C,B,1,1,bk] (0 or -inf), starts [C], and the
    key segment ids [C,B,1,1,bk] (or None)."""

    k: jax.Array
    v: jax.Array
    bias: jax.Array
    starts: jax.Array
    segments: jax.Array | None


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


def _row_segments(segments: jax.Array | None, group: int) -> jax.Array | None:
    """Query segment ids [B, L] -> [B, 1, G·L, 1], in the row order of `_group_rows`."""
    return None if segments is None else jnp.tile(segments, (1, group))[:, None, :, None]


def _chunked(x: jax.Array, num_chunks: int, chunk: int, fill: float | int) -> jax.Array:
    """[B, S, ...] -> [C, B, chunk, ...], padded with `fill`."""
    extra = num_chunks * chunk - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(x.shape[0], num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)


def _lay_out_keys(
    k: jax.Array, v: jax.Array, valid: jax.Array, segments: jax.Array | None, chunk: int
) -> _Chunks:
    """k/v [B,S,K,D], valid [B,S] bool, segments [B,S] int or None -> `_Chunks` (done once per call)."""
    num_chunks = -(-k.shape[1] // chunk)
    k = _chunked(k.astype(jnp.float32), num_chunks, chunk, 0.0).transpose(0, 1, 3, 4, 2)
    v = _chunked(v.astype(jnp.float32), num_chunks, chunk, 0.0).transpose(0, 1, 3, 2, 4)
    bias = _chunked(jnp.where(valid, 0.0, -jnp.inf), num_chunks, chunk, -jnp.inf)[:, :, None, None, :]
    seg = None if segments is None else _chunked(segments.astype(jnp.int32), num_chunks, chunk, -1)[:, :, None, None, :]
    return _Chunks(k, v, bias, jnp.arange(num_chunks) * chunk, seg)


def _online_step(carry: Carry, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> Carry:
    """Fold one key chunk (k [B,K,D,bk], v [B,K,bk,D]) into (max, denominator [B,K,R,1], accumulator [B,K,R,D]);
    bias broadcasts to the logits.

    The running max starts finite, so exp2(-inf - max) is exactly 0 and masked logits need no second select.
    """
    m_prev, l_prev, acc_prev = carry
    s = jnp.einsum("bkrd,bkds->bkrs", q, k) + bias
    m_new = jax.lax.stop_gradient(jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True)))
    p = jnp.exp2(s - m_new)
    alpha = jnp.exp2(m_prev - m_new)
    pv = jnp.einsum("bkrs,bksd->bkrd", p, v)
    return m_new, alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True), alpha * acc_prev + pv


def _scan_chunks(
    carry: Carry, q: jax.Array, q_pos: jax.Array | None, q_seg: jax.Array | None, chunks: _Chunks,
    skip_hidden: bool = False,
) -> Carry:
    """Fold every chunk into the carry; q [B,K,R,D] f32 pre-scaled by scale·log2(e), q_pos [R] (or per row
    [B,1,R]) if causal, q_seg [B,1,R,1] if segmented; skip_hidden: skip a chunk no query sees."""
    chunk = chunks.v.shape[3]

    @jax.checkpoint
    def step(carry: Carry, xs) -> tuple[Carry, None]:
        k, v, bias, start, k_seg = xs
        if q_pos is not None:
            k_pos = start + jnp.arange(chunk)
            bias = bias + jnp.where(k_pos <= q_pos[..., None], 0.0, -jnp.inf)
        visible = jnp.any(bias > -jnp.inf) if skip_hidden else None
        if q_seg is not None:
            bias = bias + jnp.where(q_seg == k_seg, 0.0, -jnp.inf)
            overlap = (jnp.max(k_seg) >= jnp.min(q_seg)) & (jnp.min(k_seg) <= jnp.max(q_seg))
            visible = overlap if visible is None else visible & overlap
        if visible is None:
            return _online_step(carry, q, k, v, bias), None
        return jax.lax.cond(visible, lambda c: _online_step(c, q, k, v, bias), lambda c: c, carry), None

    segments = chunks.segments if q_seg is not None else jnp.zeros((chunks.k.shape[0],), jnp.int32)
    carry, _ = jax.lax.scan(step, carry, (chunks.k, chunks.v, chunks.bias, chunks.starts, segments))
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


def _even_chunk(length: int, target: int) -> int:
    """The chunk length that splits `length` keys into ceil(length / target) near-equal chunks (a multiple of 8),
    so the padding is under 8 keys per chunk instead of up to a whole chunk."""
    num_chunks = -(-length // target)
    return -(-length // (8 * num_chunks)) * 8


def _valid(lengths: jax.Array, size: int) -> jax.Array:
    """[B] lengths -> [B, size] bool."""
    return jnp.arange(size)[None, :] < lengths[:, None]


def reasoner_attention(
    q_und: jax.Array,
    k_und: jax.Array,
    v_und: jax.Array,
    und_len: jax.Array,
    scale: float | None = None,
    *,
    und_segment_ids: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Causal attention among reasoner tokens: q [B,Lu,H,D], k/v [B,Lu,K,D], und_len [B] -> [B,Lu,H,D];
    und_segment_ids [B,Lu] int (optional) restricts each query to keys of its own segment."""
    blk.validate_reasoner(q_und, k_und, v_und, und_len)
    blk.validate_segments("und_segment_ids", und_segment_ids, q_und.shape[:2])
    scale_log2 = blk.resolve_scale(scale, q_und.shape[-1]) * _LOG2_E
    block_q = _choose(block_q, _DEFAULT_REASONER_BLOCK, "block_q")
    block_k = _choose(block_k, _DEFAULT_REASONER_BLOCK, "block_k")
    length, heads, kv_heads = q_und.shape[1], q_und.shape[2], k_und.shape[2]
    group = heads // kv_heads
    und_len = jnp.clip(und_len.astype(jnp.int32), 0, length)
    tiles = []
    for start in range(0, length, block_q):
        stop = min(start + block_q, length)
        keys = -(-stop // block_k) * block_k
        chunks = _lay_out_keys(
            k_und[:, :stop], v_und[:, :stop], _valid(und_len, stop),
            None if und_segment_ids is None else und_segment_ids[:, :stop], min(block_k, keys),
        )
        q_tile = _group_rows(q_und[:, start:stop].astype(jnp.float32) * scale_log2, kv_heads)
        q_pos = jnp.tile(jnp.arange(start, stop), group)
        q_seg = None if und_segment_ids is None else _row_segments(und_segment_ids[:, start:stop], group)
        carry = _scan_chunks(_init_carry(q_tile), q_tile, q_pos, q_seg, chunks)
        tiles.append(_ungroup_rows(_finish(carry), stop - start, heads))
    out = jnp.concatenate(tiles, axis=1) if len(tiles) > 1 else tiles[0]
    return _zero_padded_queries(out, und_len).astype(q_und.dtype)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    query_start: jax.Array,
    key_start: jax.Array,
    scale: float | None = None,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """T new queries [B,T,H,D] over a K/V cache k/v [B,S,K,D] -> [B,T,H,D]: query i of row b sits at cache slot
    query_start[b] + i and sees the slots s with key_start[b] <= s <= query_start[b] + i (query_start, key_start
    [B] non-negative int); a query that sees no slot gives zeros."""
    blk.validate_cached(q, k, v, query_start, key_start)
    scale_log2 = blk.resolve_scale(scale, q.shape[-1]) * _LOG2_E
    block_q = _choose(block_q, _DEFAULT_REASONER_BLOCK, "block_q")
    block_k = _choose(block_k, _DEFAULT_REASONER_BLOCK, "block_k")
    length, heads = q.shape[1], q.shape[2]
    slots, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    query_start = jnp.clip(query_start.astype(jnp.int32), 0, slots)
    key_start = jnp.clip(key_start.astype(jnp.int32), 0, slots)
    chunks = _lay_out_keys(k, v, jnp.arange(slots)[None, :] >= key_start[:, None], None, _even_chunk(slots, block_k))
    tiles = []
    for start in range(0, length, block_q):
        stop = min(start + block_q, length)
        q_tile = _group_rows(q[:, start:stop].astype(jnp.float32) * scale_log2, kv_heads)
        q_pos = query_start[:, None, None] + jnp.tile(jnp.arange(start, stop), group)[None, None, :]
        carry = _scan_chunks(_init_carry(q_tile), q_tile, q_pos, None, chunks, skip_hidden=True)
        tiles.append(_ungroup_rows(_finish(carry), stop - start, heads))
    out = jnp.concatenate(tiles, axis=1) if len(tiles) > 1 else tiles[0]
    return out.astype(q.dtype)


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
    und_segment_ids: jax.Array | None = None,
    gen_segment_ids: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Generator queries [B,Lg,H,D] over valid reasoner keys [B,Lu,K,D] and generator keys [B,Lg,K,D];
    with segment ids ([B,Lu] and [B,Lg], both or neither) a query sees only keys of its own segment."""
    blk.validate_generator(q_gen, k_und_for_gen, v_und, k_gen, v_gen, und_len, gen_len)
    blk.validate_segment_pair(und_segment_ids, gen_segment_ids, k_und_for_gen.shape[:2], q_gen.shape[:2])
    scale_log2 = blk.resolve_scale(scale, q_gen.shape[-1]) * _LOG2_E
    block_q = _choose(block_q, _DEFAULT_GENERATOR_BLOCK_Q, "block_q")
    block_k = _choose(block_k, _DEFAULT_GENERATOR_BLOCK_K, "block_k")
    batch, lg, heads, _ = q_gen.shape
    lu, kv_heads = k_und_for_gen.shape[1], k_gen.shape[2]
    group = heads // kv_heads
    und_len = jnp.clip(und_len.astype(jnp.int32), 0, lu)
    gen_len = jnp.clip(gen_len.astype(jnp.int32), 0, lg)
    segmented = gen_segment_ids is not None
    chunks = _lay_out_keys(
        jnp.concatenate([k_und_for_gen, k_gen], axis=1),
        jnp.concatenate([v_und, v_gen], axis=1),
        jnp.concatenate([_valid(und_len, lu), _valid(gen_len, lg)], axis=1),
        jnp.concatenate([und_segment_ids, gen_segment_ids], axis=1) if segmented else None,
        _even_chunk(lu + lg, block_k),
    )
    block_q = min(block_q, lg)
    num_tiles = -(-lg // block_q)
    q_tiles = blk.pad_sequence(q_gen, num_tiles * block_q, axis=1).astype(jnp.float32) * scale_log2
    q_tiles = q_tiles.reshape(batch, num_tiles, block_q, heads, -1).swapaxes(0, 1)
    if segmented:
        seg_tiles = _chunked(gen_segment_ids.astype(jnp.int32), num_tiles, block_q, -1)
    else:
        seg_tiles = jnp.zeros((num_tiles,), jnp.int32)

    def attend_tile(xs: tuple[jax.Array, jax.Array]) -> jax.Array:
        q_tile, seg_tile = xs
        rows = _group_rows(q_tile, kv_heads)
        q_seg = _row_segments(seg_tile, group) if segmented else None
        return _ungroup_rows(_finish(_scan_chunks(_init_carry(rows), rows, None, q_seg, chunks)), block_q, heads)

    out = jax.lax.map(attend_tile, (q_tiles, seg_tiles)).swapaxes(0, 1)
    out = out.reshape(batch, num_tiles * block_q, heads, -1)[:, :lg]
    return _zero_padded_queries(out, gen_len).astype(q_gen.dtype)

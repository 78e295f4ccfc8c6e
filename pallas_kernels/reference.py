"""The f32 XLA reference for Cosmos 3 joint attention: the oracle every kernel is tested against.

Layout (right padding, one row of the batch per CFG branch or sample):

    reasoner queries  q_und [B, Lu, H, D]   attend causally to k_und/v_und [B, Lu, K, D]
    generator queries q_gen [B, Lg, H, D]   attend, unmasked, to every valid reasoner key (k_und_for_gen, v_und)
                                             and every valid generator key (k_gen, v_gen [B, Lg, K, D])

`und_len[b]` / `gen_len[b]` count the valid (unpadded) tokens of row b. Keys past them are masked; query rows
past them produce zeros. GQA: query head h reads kv head h // (H // K) (repeat-interleave, not tiling).
Segment ids (optional, int [B, Lu] / [B, Lg]) pack several samples into one row: a query then sees only keys
with its own id, on top of the masks above. Logits and softmax are computed in f32; outputs are cast back to
the query dtype.

The reasoner alone (text answers) runs over a K/V cache instead, left-padded:

    cached queries    q [B, T, H, D] of T new tokens, query i of row b at cache slot query_start[b] + i, attend
                      to the slots s of k/v [B, S, K, D] with key_start[b] <= s <= query_start[b] + i
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B,Q,H,D], k/v [B,S,K,D], mask [B,Q,S] bool -> [B,Q,H,D] in q.dtype (zeros where a row has no key)."""
    batch, num_q, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    group = num_heads // num_kv
    qg = q.reshape(batch, num_q, num_kv, group, head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - row_max)
    probs = jnp.where(mask[:, None, None], probs, 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, num_q, num_heads, head_dim).astype(q.dtype)


def reasoner_attention_reference(
    q_und: jax.Array, k_und: jax.Array, v_und: jax.Array, und_len: jax.Array, scale: float | None = None, *,
    und_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal attention among reasoner tokens. Shapes as in the module docstring; returns [B, Lu, H, D]."""
    lu = q_und.shape[1]
    scale = q_und.shape[-1] ** -0.5 if scale is None else scale
    pos = jnp.arange(lu)
    valid = pos[None, :] < und_len[:, None]
    mask = (pos[None, :, None] >= pos[None, None, :]) & valid[:, None, :] & valid[:, :, None]
    if und_segment_ids is not None:
        mask = mask & (und_segment_ids[:, :, None] == und_segment_ids[:, None, :])
    return _grouped_attention(q_und, k_und, v_und, mask, scale)


def generator_attention_reference(
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
) -> jax.Array:
    """Generator queries over all valid reasoner + generator keys, no causal mask. Returns [B, Lg, H, D]."""
    lu, lg = k_und_for_gen.shape[1], q_gen.shape[1]
    scale = q_gen.shape[-1] ** -0.5 if scale is None else scale
    keys = jnp.concatenate([k_und_for_gen, k_gen], axis=1)
    values = jnp.concatenate([v_und, v_gen], axis=1)
    key_valid = jnp.concatenate(
        [jnp.arange(lu)[None, :] < und_len[:, None], jnp.arange(lg)[None, :] < gen_len[:, None]], axis=1
    )
    query_valid = jnp.arange(lg)[None, :] < gen_len[:, None]
    mask = query_valid[:, :, None] & key_valid[:, None, :]
    if gen_segment_ids is not None:
        key_segments = jnp.concatenate([und_segment_ids, gen_segment_ids], axis=1)
        mask = mask & (gen_segment_ids[:, :, None] == key_segments[:, None, :])
    return _grouped_attention(q_gen, keys, values, mask, scale)


def cached_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, query_start: jax.Array, key_start: jax.Array,
    scale: float | None = None,
) -> jax.Array:
    """Causal attention of new queries over a K/V cache, within each row's key window (module docstring);
    a query that sees no slot gives zeros. Returns [B, T, H, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    query_slot = query_start[:, None] + jnp.arange(q.shape[1])[None, :]
    key_slot = jnp.arange(k.shape[1])[None, None, :]
    mask = (key_slot <= query_slot[:, :, None]) & (key_slot >= key_start[:, None, None])
    return _grouped_attention(q, k, v, mask, scale)

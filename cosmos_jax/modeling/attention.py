"""The one attention dispatch point of the model.

Two passes: the joint forward's reasoner and generator attention (`attention_functions`), and the reasoner
alone over its K/V cache (`cached_attention_function`, prompt logits, prefill and decode). Implementations, all
with the signatures of `pallas_kernels.reference`:
  "xla"     plain einsum/softmax reference (materialises the logits; the test oracle),
  "blocked" XLA with key blocks and an online softmax (the fast CPU path),
  "pallas"  the Pallas kernel (GPU/TPU; interpret mode on CPU, for tests; the cached pass is forward only),
  "auto"    pallas on GPU/TPU, blocked on CPU.

Axis letters of every attention einsum in the project (as in `pallas_kernels.reference`):
  b  batch row                      n  segment / window / image (attention run independently per n)
  q  query position                 s  key / value position
  h  query head                     k  key / value head (grouped-query attention)
  g  query heads per key/value head (h = k·g; query head h reads key/value head h // g)
  d  head dimension                 c  channels (the VAE's single-head attention: d = c)
  l  token position outside attention;  i, o  input / output features of a projection
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blocked", "pallas")


def resolve(impl: str, backend: str | None = None) -> str:
    """The concrete implementation `impl` stands for on `backend` (default: jax's default backend)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    return "pallas" if backend in ("gpu", "cuda", "rocm", "tpu") else "blocked"


def attention_functions(impl: str) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """(reasoner_attention, generator_attention) for an implementation name."""
    impl = resolve(impl)
    if impl == "xla":
        from pallas_kernels import reference

        return reference.reasoner_attention_reference, reference.generator_attention_reference
    if impl == "blocked":
        from pallas_kernels.xla import blocked

        return blocked.reasoner_attention, blocked.generator_attention
    from pallas_kernels import joint_attention

    return joint_attention.reasoner_attention, joint_attention.generator_attention


def cached_attention_function(impl: str) -> Callable[..., jax.Array]:
    """The reasoner's attention over its K/V cache for an implementation name:
    fn(q [B,T,H,hd], k/v [B,S,K,hd], query_start [B], key_start [B] int32) -> [B,T,H,hd], where query i of row b
    sits at cache slot query_start[b] + i and sees the slots s with key_start[b] <= s <= query_start[b] + i.

    A query that sees no slot (a left-padding position) gives the mean of every value under "xla" (a uniform
    softmax over masked logits) and zeros otherwise; such positions are never read."""
    impl = resolve(impl)
    if impl == "xla":
        return _masked_cached_attention
    if impl == "blocked":
        from pallas_kernels.xla import blocked

        return blocked.cached_attention
    from pallas_kernels import joint_attention

    return joint_attention.cached_attention


def _masked_cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, query_start: jax.Array, key_start: jax.Array
) -> jax.Array:
    """`cached_attention_function("xla")`: the window as an explicit [B, T, S] mask for `masked_attention`."""
    query_slot = query_start[:, None] + jnp.arange(q.shape[1])[None, :]
    key_slot = jnp.arange(k.shape[1])[None, None, :]
    visible = (key_slot <= query_slot[:, :, None]) & (key_slot >= key_start[:, None, None])
    return masked_attention(q, k, v, visible)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Attention under an explicit visibility mask (plain XLA; the "xla" cached pass).

    q [B, T, H, hd], k/v [B, S, K, hd], visible [B, T, S] bool -> [B, T, H, hd]; GQA head h reads kv head h // G.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * d**-0.5
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, h, d)

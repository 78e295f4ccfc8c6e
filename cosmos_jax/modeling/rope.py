"""Interleaved 3D mRoPE (docs/model.md, "Sequence layout"): f32 angles, cos/sin cast to the model dtype, rotate-half."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq[j] = 1 / theta^(2j/head_dim), j < head_dim/2, in float32 step by step like the reference."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents, dtype=np.float32)).astype(np.float32)


def axis_of_channel(head_dim: int, rope_axes_dim: tuple[int, int, int]) -> np.ndarray:
    """For each of the head_dim/2 frequency channels, which position axis drives it: 0=T, 1=H, 2=W.

    H takes channels 1, 4, 7, ... below 3*rope_axes_dim[1]; W takes 2, 5, 8, ... below 3*rope_axes_dim[2];
    every other channel (including the tail past 60 for head_dim 128) takes T.
    """
    axes = np.zeros(head_dim // 2, dtype=np.int32)
    axes[1 : 3 * rope_axes_dim[1] : 3] = 1
    axes[2 : 3 * rope_axes_dim[2] : 3] = 2
    return axes


def mrope_cos_sin(
    position_ids: jax.Array, head_dim: int, theta: float, rope_axes_dim: tuple[int, int, int], dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """position_ids [..., 3, N] (t, h, w; float32) -> cos, sin [..., N, head_dim] in `dtype`.

    Angles are pos * inv_freq in f32 (one exact product each), channels interleaved per `axis_of_channel`,
    duplicated to head_dim (cat(freqs, freqs)), cos/sin taken in f32 then cast.
    """
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))
    axes = jnp.asarray(axis_of_channel(head_dim, rope_axes_dim))
    pos = position_ids.astype(jnp.float32)
    per_channel_pos = jnp.take(pos, axes, axis=-2)  # [..., half, N]
    freqs = jnp.swapaxes(per_channel_pos, -1, -2) * inv_freq  # [..., N, half]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, N, heads, D]; cos/sin [B, N, D] -> x*cos + rotate_half(x)*sin, computed in x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin

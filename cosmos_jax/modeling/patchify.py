"""Latent video <-> patch tokens (docs/model.md, "Sequence layout"): zero-pad odd H/W bottom/right, (py, px, c) features."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patch_grid(latent_shape: tuple[int, int, int], patch: int) -> tuple[int, int, int]:
    """(T, H, W) latent -> (T, ceil(H/p), ceil(W/p)) token grid."""
    t, h, w = latent_shape
    return t, -(-h // patch), -(-w // patch)


def patchify(latents: jax.Array, patch: int) -> jax.Array:
    """[B, C, T, H, W] -> [B, T*hp*wp, p*p*C]; tokens in (t, h, w) raster order, feature (py*p + px)*C + c."""
    b, c, t, h, w = latents.shape
    _, hp, wp = patch_grid((t, h, w), patch)
    latents = jnp.pad(latents, ((0, 0), (0, 0), (0, 0), (0, hp * patch - h), (0, wp * patch - w)))
    x = latents.reshape(b, c, t, hp, patch, wp, patch)
    x = jnp.transpose(x, (0, 2, 3, 5, 4, 6, 1))  # b t hp wp py px c
    return x.reshape(b, t * hp * wp, patch * patch * c)


def unpatchify(tokens: jax.Array, latent_shape: tuple[int, int, int], channels: int, patch: int) -> jax.Array:
    """[B, T*hp*wp, p*p*C] -> [B, C, T, H, W], cropping the bottom/right padding."""
    t, h, w = latent_shape
    _, hp, wp = patch_grid(latent_shape, patch)
    b = tokens.shape[0]
    x = tokens.reshape(b, t, hp, wp, patch, patch, channels)
    x = jnp.transpose(x, (0, 6, 1, 2, 4, 3, 5))  # b c t hp py wp px
    x = x.reshape(b, channels, t, hp * patch, wp * patch)
    return x[:, :, :, :h, :w]


def frame_mask_to_tokens(frame_mask: jax.Array, tokens_per_frame: int) -> jax.Array:
    """[B, T] per-frame flags -> [B, T*tokens_per_frame] per-token flags."""
    return jnp.repeat(frame_mask, tokens_per_frame, axis=1)

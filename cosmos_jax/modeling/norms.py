"""RMSNorm in the three rounding variants the reference uses (docs/model.md, "Rounding and timestep details")."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

NormVariant = Literal["diffusers", "nemotron", "llama"]


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, statistics and result in f32."""
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(variance + eps)


def apply_rms_scale(x: jax.Array, normed: jax.Array, scale: jax.Array, variant: NormVariant) -> jax.Array:
    """Multiply the f32-normalised activations by the learned scale with the variant's rounding.

    diffusers: round the normalised values to the weight dtype (if half precision), multiply in that dtype.
    nemotron:  multiply in f32 by the f32 weight, round once to the input dtype.
    llama:     round to the input dtype, multiply by the weight (transformers' LlamaRMSNorm).
    """
    if variant == "diffusers":
        if scale.dtype in (jnp.bfloat16, jnp.float16):
            normed = normed.astype(scale.dtype)
        return normed * scale
    if variant == "nemotron":
        return (scale.astype(jnp.float32) * normed).astype(x.dtype)
    if variant == "llama":
        return scale * normed.astype(x.dtype)
    raise ValueError(f"unknown RMSNorm variant {variant!r}")


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale ('scale', shape [features])."""

    eps: float
    variant: NormVariant = "diffusers"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return apply_rms_scale(x, rms_normalize(x, self.eps), scale, self.variant)

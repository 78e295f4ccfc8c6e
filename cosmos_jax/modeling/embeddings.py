"""Timestep embedding and the per-embodiment-domain action projection (docs/model.md: "Rounding and timestep details",
"Conditioning per mode")."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

TIMESTEP_CHANNELS = 256


def timestep_sinusoid(t: jax.Array, channels: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> jax.Array:
    """t [...] (already scaled, f32) -> [..., channels] = [cos(t*f_k), sin(t*f_k)], f_k = exp(-ln(P)*k/(channels/2))."""
    half = channels // 2
    exponent = (-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)) / jnp.float32(half)
    args = t.astype(jnp.float32)[..., None] * jnp.exp(exponent)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_2(silu(linear_1(sinusoid))): always f32 parameters and arithmetic; the caller casts the result."""

    hidden_size: int

    @nn.compact
    def __call__(self, sinusoid: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(  # noqa: E731
            self.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32, name=name
        )
        return dense("linear_2")(nn.silu(dense("linear_1")(sinusoid.astype(jnp.float32))))


class DomainAwareLinear(nn.Module):
    """y = x @ kernel[domain] + bias[domain], one (in, out) matrix per embodiment domain.

    x [B, N, in], domain [B] int32 -> [B, N, out]. kernel [domains, in, out], bias [domains, out].
    """

    features: int
    num_domains: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, domain: jax.Array) -> jax.Array:
        init = nn.initializers.normal(stddev=0.02)
        kernel = self.param("kernel", init, (self.num_domains, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.num_domains, self.features), self.param_dtype)
        w = jnp.take(kernel, domain, axis=0).astype(self.dtype)
        b = jnp.take(bias, domain, axis=0).astype(self.dtype)
        return jnp.einsum("bli,bio->blo", x.astype(self.dtype), w) + b[:, None, :]

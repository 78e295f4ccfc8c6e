"""The tower MLPs: SwiGLU (`silu`, Nano/Super) and squared ReLU (`relu2`, Edge)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.modeling.linear import Linear


class MLP(nn.Module):
    """silu: down(silu(gate(x)) * up(x)); relu2: down(relu(up(x))**2). No biases. x [..., D] -> [..., D]."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda features, name: Linear(features, self.dtype, self.param_dtype, name=name)  # noqa: E731
        up = dense(self.intermediate_size, "up_proj")(x)
        if self.hidden_act == "silu":
            hidden = nn.silu(dense(self.intermediate_size, "gate_proj")(x)) * up
        elif self.hidden_act == "relu2":
            hidden = jnp.square(nn.relu(up))
        else:
            raise ValueError(f"hidden_act must be 'silu' or 'relu2', got {self.hidden_act!r}")
        return dense(self.hidden_size, "down_proj")(hidden)

"""The layer linears: `Linear` (nn.Dense's math and parameters, no bias) and the W8A8 matmul of an FP8 kernel.

W8A8 is ModelOpt's per-tensor FP8 GEMM (`fp8_per_tensor_gemm`, the native forward of the FP8 revision):

    input_scale = input_amax / 448                (calibrated; the activation's own amax when there is none)
    x_fp8       = clip(x / input_scale, -448, 448) as float8_e4m3fn
    y           = (x_fp8 @ w_fp8, accumulated in float32) * (input_scale * weight_scale), cast to x's dtype

The reference runs the last line as `torch._scaled_mm(..., out_dtype=x.dtype)`; here it is a `dot_general` on the
two float8 operands with `preferred_element_type=float32`, which XLA:GPU lowers to a cuBLASLt FP8 GEMM on
compute capability >= 8.9 (XLA:CPU upcasts the operands to float32 and computes the same numbers). The division
runs in float32 whatever x's dtype (the reference's `torch.compile`d quantizer computes in float32 and rounds once,
to float8). The layer linears have no bias.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.modeling.weights import Fp8Kernel

FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


def dynamic_input_scale(x: jax.Array) -> jax.Array:
    """amax / 448 per row of x [B, ...] -> [B, 1, ..., 1] float32 (1 for an all-zero row).

    The reference takes the amax of everything one linear call sees; its calls hold one row (one sample, one
    guidance branch), so per row is the same scale when rows are batched."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)), keepdims=True)
    return jnp.where(amax > 0, amax, FP8_MAX) / FP8_MAX


def quantize_activation(x: jax.Array, input_scale: jax.Array) -> jax.Array:
    """x [..., in] to float8_e4m3fn: clip(x / input_scale, -448, 448), divided in float32."""
    return jnp.clip(x.astype(jnp.float32) / input_scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def w8a8_matmul(x: jax.Array, kernel: Fp8Kernel) -> jax.Array:
    """x [B, ..., in] @ kernel [in, out] -> [B, ..., out] in x's dtype, both operands float8 (see the module)."""
    input_scale = dynamic_input_scale(x) if kernel.input_scale is None else kernel.input_scale.reshape(())
    x_fp8 = quantize_activation(x, input_scale)
    acc = jax.lax.dot_general(x_fp8, kernel.weight.qvalue, (((x.ndim - 1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return (acc * (input_scale * kernel.weight_scale.reshape(()))).astype(x.dtype)


class Linear(nn.Module):
    """y = x @ kernel, kernel [in, features], no bias, computed in `dtype` (as nn.Dense(use_bias=False)).

    The kernel may be an `Fp8Kernel` (left in place by the layer loop for a W8A8 step): then `w8a8_matmul`."""

    features: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
        if isinstance(kernel, Fp8Kernel):
            return w8a8_matmul(x.astype(self.dtype), kernel)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))

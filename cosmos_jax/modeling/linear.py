"""`Linear` (nn.Dense's math and parameters) and the W8A8 matmul of an FP8 kernel.

W8A8 is ModelOpt's per-tensor FP8 GEMM (`fp8_per_tensor_gemm`, the native forward of the FP8 revision):

    input_scale = input_amax / 448                (calibrated; the activation's own amax when there is none)
    x_fp8       = clip(x / input_scale, -448, 448) as float8_e4m3fn
    y           = (x_fp8 @ w_fp8, accumulated in float32) * (input_scale * weight_scale), cast to x's dtype

The reference runs the last line as `torch._scaled_mm(..., out_dtype=x.dtype)`; here it is a `dot_general` on the
two float8 operands with `preferred_element_type=float32`, which XLA:GPU lowers to a cuBLASLt FP8 GEMM on
compute capability >= 8.9 (XLA:CPU upcasts the operands to float32 and computes the same numbers). The division
runs in float32 whatever x's dtype (the reference's `torch.compile`d quantizer computes in float32 and rounds once,
to float8). The layer linears have no bias; the generator's modality projections have one, which `w8a8_matmul`
adds to the float32 product before the cast to x's dtype (the order of `torch._scaled_mm(..., bias=...)`; for
float32 activations adding it after the cast gives the same numbers, for bf16 one rounding apart).
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


def w8a8_matmul(x: jax.Array, kernel: Fp8Kernel, bias: jax.Array | None = None) -> jax.Array:
    """x [B, ..., in] @ kernel [in, out] (+ bias [out]) -> [B, ..., out] in x's dtype, both operands float8 (see
    the module)."""
    input_scale = dynamic_input_scale(x) if kernel.input_scale is None else kernel.input_scale.reshape(())
    x_fp8 = quantize_activation(x, input_scale)
    acc = jax.lax.dot_general(x_fp8, kernel.weight.qvalue, (((x.ndim - 1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    out = acc * (input_scale * kernel.weight_scale.reshape(()))
    return (out if bias is None else out + bias.astype(jnp.float32)).astype(x.dtype)


class Linear(nn.Module):
    """y = x @ kernel (+ bias), kernel [in, features], bias [features], computed in `dtype`: nn.Dense's math,
    parameters and initializers (a bias only with use_bias, as the layer linears have none).

    The kernel may be an `Fp8Kernel` (left in place for a W8A8 step): then `w8a8_matmul`."""

    features: int
    dtype: Any
    param_dtype: Any
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype) \
            if self.use_bias else None
        if isinstance(kernel, Fp8Kernel):
            return w8a8_matmul(x.astype(self.dtype), kernel, bias)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))

"""Weights held in a form the layer loop materializes one layer at a time, inside the scan.

- `qwix.QArray`: int8/fp8 values plus scales (weight-only quantization); materialized as qwix's dequantization,
  `qvalue.astype(scale.dtype) * scale`, the scale held in the activation dtype (the W8A16 formula
  `w.astype(x.dtype) * scale`).
- `Fp8Kernel`: a linear of ModelOpt's FP8 revision: its E4M3 `QArray` (the W8A16 form above) plus the float32
  scales of its W8A8 form and the reference's linear group. `materialize_tree(tree, w8a8)` dequantizes it unless
  its group is in `w8a8`; then it stays as it is and `cosmos_jax.modeling.linear.Linear` runs it W8A8.
- `LowRankUpdate`: a base kernel (plain or quantized) plus a LoRA delta `a @ b` (a [..., in, r], b [..., r, out],
  the adapter scale already folded into b; several adapters are concatenated along r).

So the device holds the stacks as stored plus one layer in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import qwix


@flax.struct.dataclass
class Fp8Kernel:
    """One E4M3 linear with one scale per tensor (per layer when stacked), [..., in, out].

    weight: `QArray`, qvalue [..., in, out] float8_e4m3fn, scale [..., 1, 1] in the activation dtype (W8A16).
    weight_scale: [..., 1, 1] float32, the weight's W8A8 scale (ModelOpt's weight amax / 448).
    input_scale: [..., 1, 1] float32, the calibrated (static) activation scale (input amax / 448); None: the
      activation's own amax / 448 at every call (dynamic).
    group: "generation" or "reasoner" (a layer linear: which steps of the FP8 step policy run it W8A8), or
      "native" (a modality projection: W8A8 at every step).
    """

    weight: qwix.QArray
    weight_scale: jax.Array
    input_scale: jax.Array | None
    group: str = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.qvalue.shape)


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, (qwix.QArray, Fp8Kernel))


def dequantize(leaf: Any) -> jax.Array:
    """The W8A16 kernel of a `QArray` or `Fp8Kernel`: values times scale, in the scale's (activation) dtype."""
    return qwix.dequantize(leaf.weight if isinstance(leaf, Fp8Kernel) else leaf)


@flax.struct.dataclass
class LowRankUpdate:
    """kernel = base + a @ b. base [..., in, out] (array, QArray or Fp8Kernel); a [..., in, r]; b [..., r, out]."""

    base: Any
    a: jax.Array
    b: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def materialize(self) -> jax.Array:
        base = dequantize(self.base) if is_quantized(self.base) else self.base
        delta = jnp.einsum("...ir,...ro->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (base.astype(jnp.float32) + delta).astype(base.dtype)


def is_held(leaf: Any) -> bool:
    """True for the leaf kinds `materialize_tree` turns into plain arrays."""
    return isinstance(leaf, (qwix.QArray, Fp8Kernel, LowRankUpdate))


def materialize_tree(tree: Any, w8a8: Collection[str] = ()) -> Any:
    """Every held leaf of `tree` (QArray, Fp8Kernel, LowRankUpdate) replaced by its plain array, except the
    `Fp8Kernel`s whose group is in `w8a8` (they stay, to run W8A8); other leaves as they are."""

    def materialize(leaf: Any) -> Any:
        if isinstance(leaf, LowRankUpdate):
            return leaf.materialize()
        if isinstance(leaf, Fp8Kernel) and leaf.group in w8a8:
            return leaf
        return dequantize(leaf) if is_quantized(leaf) else leaf

    return jax.tree.map(materialize, tree, is_leaf=is_held)

"""Weights held in a form the layer loop materializes one layer at a time, inside the scan.

- `qwix.QArray`: int8/fp8 values plus scales (weight-only quantization); materialized as qwix's dequantization,
  `qvalue.astype(scale.dtype) * scale`, the scale held in the activation dtype (the W8A16 formula
  `w.astype(x.dtype) * scale`).
- `LowRankUpdate`: a base kernel (plain or quantized) plus a LoRA delta `a @ b` (a [..., in, r], b [..., r, out],
  the adapter scale already folded into b; several adapters are concatenated along r).

So the device holds the stacks as stored plus one layer in the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import qwix


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, qwix.QArray)


@flax.struct.dataclass
class LowRankUpdate:
    """kernel = base + a @ b. base [..., in, out] (array or QArray); a [..., in, r]; b [..., r, out]."""

    base: Any
    a: jax.Array
    b: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def materialize(self) -> jax.Array:
        base = qwix.dequantize(self.base) if is_quantized(self.base) else self.base
        delta = jnp.einsum("...ir,...ro->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (base.astype(jnp.float32) + delta).astype(base.dtype)


def is_held(leaf: Any) -> bool:
    """True for the leaf kinds `materialize_tree` turns into plain arrays."""
    return isinstance(leaf, (qwix.QArray, LowRankUpdate))


def _materialize(leaf: Any) -> Any:
    if isinstance(leaf, LowRankUpdate):
        return leaf.materialize()
    if is_quantized(leaf):
        return qwix.dequantize(leaf)
    return leaf


def materialize_tree(tree: Any) -> Any:
    """Every held leaf of `tree` (QArray, LowRankUpdate) replaced by its plain array; others as they are."""
    return jax.tree.map(_materialize, tree, is_leaf=is_held)

"""Weights held quantized: `qwix.QArray` leaves (int8 or fp8 values plus their scales) inside a parameter tree.

The model dequantizes one layer's weights at a time, inside the scanned layer loop, so the device holds the
quantized stacks plus one layer in the compute dtype. Dequantization is qwix's: `qvalue.astype(scale.dtype) *
scale`, the scale held in the activation dtype (the weight-only W8A16 formula `w.astype(x.dtype) * scale`).
"""

from __future__ import annotations

from typing import Any

import jax
import qwix


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, qwix.QArray)


def dequantize_tree(tree: Any) -> Any:
    """Every `qwix.QArray` leaf of `tree` replaced by its dequantized array (dtype = its scale's); others as is."""
    return jax.tree.map(lambda x: qwix.dequantize(x) if is_quantized(x) else x, tree, is_leaf=is_quantized)

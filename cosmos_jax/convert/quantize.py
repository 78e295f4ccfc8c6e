"""Weight-only quantization of the transformer through qwix: int8 or fp8 (E4M3), one scale per output channel.

Rules: only the layer linears of both towers (attention q/k/v/o and the MLP projections, the bulk of the bytes)
are quantized; norms, the token embedding, the LM head, the time embedder, the modality projections and the
action/audio heads stay at full precision. A layer stack is [L, in, out]: its scales are per layer and per output
channel, [L, 1, out] (the channel axis of a single kernel, 1, shifted by one, plus the layer axis), so no scale is
shared across layers. Leaves can be quantized one at a time as they stream in (`quantize_leaf`), so the host never
holds the whole tree at full precision.

Stored form (a converted folder written with `convert --quantize`): a quantized kernel at PATH is two leaves,
PATH/qvalue (int8 or float8_e4m3fn, the kernel's shape) and PATH/scale (the kernel's dtype, its reduced axis of
size 1), the QArray's own fields (`stored_leaves`, `from_stored`). On a mesh the values take the kernel's sharding
and the scale the same with its size-1 (reduced) axes unsharded (`scale_sharding`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.sharding import NamedSharding, PartitionSpec

from cosmos_jax.modeling.weights import is_quantized

QUANTIZE_MODES = ("int8", "fp8")
QTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
TOWERS = ("reasoner", "generator")
LAYER_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

QVALUE, SCALE = "qvalue", "scale"  # the stored leaves of one quantized kernel (the QArray's field names)

LeafPath = tuple[str, ...]


def check_mode(mode: str | None, flag: str = "--quantize") -> str | None:
    """`mode` if it is None or one of QUANTIZE_MODES; ValueError naming `flag` otherwise."""
    if mode is None or mode in QUANTIZE_MODES:
        return mode
    raise ValueError(f"{flag} {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")


def is_quantized_path(path: LeafPath) -> bool:
    """True for the kernels the rules quantize: (tower, "layers", [..., ] <layer linear>, "kernel")."""
    return (len(path) >= 4 and path[0] in TOWERS and path[1] == "layers" and path[-1] == "kernel"
            and path[-2] in LAYER_LINEARS)


def channel_axes(ndim: int, stacked: bool) -> tuple[int, ...]:
    """Axes with their own scale for a Flax kernel [(L,) in, out]: the output axis, and the layer axis if stacked."""
    if stacked:
        if ndim != 3:
            raise ValueError(f"a stacked kernel must be [L, in, out], got {ndim} dims")
        return (0, 2)
    if ndim != 2:
        raise ValueError(f"a kernel must be [in, out], got {ndim} dims")
    return (1,)


def quantize_array(array: Any, mode: str, *, stacked: bool, scale_dtype: Any) -> qwix.QArray:
    """Absmax per-channel symmetric quantization of one kernel; scale held in `scale_dtype`."""
    x = jnp.asarray(array)
    return qwix.quantize(x, QTYPES[mode], channelwise_axes=channel_axes(x.ndim, stacked),
                         scale_dtype=scale_dtype)


def quantize_leaf(path: LeafPath, array: Any, mode: str | None) -> Any:
    """`array` quantized if the rules pick `path` (scale dtype = the array's dtype), else returned unchanged."""
    if mode is None or not is_quantized_path(path):
        return array
    return quantize_array(array, mode, stacked=path[1] == "layers", scale_dtype=array.dtype)


def stored_leaves(path: LeafPath, array: np.ndarray, mode: str | None) -> list[tuple[LeafPath, np.ndarray]]:
    """The leaves a converted folder stores for `array` at `path` (tower first): (path, array) itself, or, when
    the rules quantize it, (path + ("qvalue",), values) and (path + ("scale",), scales) as numpy."""
    value = quantize_leaf(path, array, mode)
    if not is_quantized(value):
        return [(path, array)]
    return [(path + (QVALUE,), np.asarray(value.qvalue)), (path + (SCALE,), np.asarray(value.scale))]


def from_stored(qvalue: Any, scale: Any, mode: str) -> qwix.QArray:
    """The QArray `quantize_array` builds, from its stored values and scales."""
    if np.dtype(qvalue.dtype) != np.dtype(QTYPES[mode]):
        raise ValueError(f"{mode} values must be {np.dtype(QTYPES[mode])}, got {np.dtype(qvalue.dtype)}")
    return qwix.QArray(qvalue=qvalue, scale=scale, zero_point=None, qtype=QTYPES[mode])


def scale_sharding(weight: jax.sharding.Sharding, scale_shape: Sequence[int]) -> jax.sharding.Sharding:
    """The sharding of a kernel's scales given the kernel's: its spec with the size-1 (reduced) axes unsharded
    (a NamedSharding), else the kernel's own (one device)."""
    if not isinstance(weight, NamedSharding):
        return weight
    entries = tuple(weight.spec) + (None,) * (len(scale_shape) - len(weight.spec))
    kept = [None if size == 1 else entry for size, entry in zip(scale_shape, entries)]
    while kept and kept[-1] is None:
        kept.pop()
    return NamedSharding(weight.mesh, PartitionSpec(*kept), memory_kind=weight.memory_kind)


def place_quantized(value: Any, weight: jax.sharding.Sharding | None) -> Any:
    """A quantized leaf with its values in the kernel's sharding `weight` and its scales in `scale_sharding`;
    anything else (or no sharding) as it is."""
    if weight is None or not is_quantized(value):
        return value
    return dataclasses.replace(value, qvalue=jax.device_put(value.qvalue, weight),
                               scale=jax.device_put(value.scale, scale_sharding(weight, value.scale.shape)))


def quantize_params(params: dict[str, Any], mode: str | None) -> dict[str, Any]:
    """Both trees with the rules' kernels quantized (a no-op for mode None)."""
    check_mode(mode)

    def one(keys, leaf):
        path = tuple(str(getattr(k, "key", k)) for k in keys)
        return quantize_leaf(path, leaf, mode)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def leaf_bytes(path: LeafPath, shape: Sequence[int], dtype: Any, mode: str | None) -> int:
    """Bytes a leaf of `shape` takes on device when held in `dtype` under `mode` (values plus scales)."""
    count = int(np.prod(shape, dtype=np.int64))
    if mode is None or not is_quantized_path(path):
        return count * np.dtype(dtype).itemsize
    scales = int(np.prod(shape, dtype=np.int64) // shape[-2])  # one per (layer, output channel)
    return count * 1 + scales * np.dtype(dtype).itemsize


def tree_bytes(params: Any) -> int:
    """Bytes held by a (possibly quantized) tree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))

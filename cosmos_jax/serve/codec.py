"""msgpack with numpy arrays, in the encoding openpi's `openpi_client.msgpack_numpy` uses.

An array travels as the map {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": [...]},
a numpy scalar as {b"__npgeneric__": True, b"data": item, b"dtype": dtype.str}. Written here rather than imported
because openpi-client pins numpy < 2; the format is what matters for the wire and is pinned by a test against
openpi-client itself. Unlike a pickle-based codec nothing here runs code: object, void and complex dtypes are
refused both ways, and a decoded array's byte count must match its dtype and shape.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = ("V", "O", "c")


class CodecError(ValueError):
    """A message that is not valid msgpack-numpy."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise CodecError(f"unsupported dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise CodecError(f"cannot encode {type(obj).__name__}")


def _dtype(code: Any) -> np.dtype:
    try:
        dtype = np.dtype(code.decode() if isinstance(code, bytes) else code)
    except TypeError:
        raise CodecError(f"unknown dtype {code!r}") from None
    if dtype.kind in _REFUSED_KINDS:
        raise CodecError(f"unsupported dtype {dtype}")
    return dtype


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise CodecError(f"bad array shape {shape!r}")
        if not isinstance(data, bytes) or len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CodecError(f"array data does not match dtype {dtype} and shape {list(shape)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def packb(obj: Any) -> bytes:
    """Encode a tree of dicts, lists, scalars, strings and numpy arrays."""
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
    """Decode one message; CodecError when it is not valid msgpack-numpy."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, strict_map_key=False)
    except CodecError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise CodecError(f"not a msgpack message: {e}") from None

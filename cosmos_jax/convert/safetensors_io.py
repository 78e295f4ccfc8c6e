"""Safetensors checkpoints in the Hugging Face Hub layout: validated lazy reads and atomic sharded writes.

A component folder as `save_pretrained` leaves it holds either one `{name}.safetensors` or
`{name}-0000i-of-0000n.safetensors` shards plus `{name}.safetensors.index.json`
(`{"metadata": {"total_size": N}, "weight_map": {key: shard}}`); `name` is `diffusion_pytorch_model`
(diffusers) or `model` (transformers).

A safetensors file is: 8 bytes little-endian u64 `N`, `N` bytes of UTF-8 JSON mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the byte after the header, the
tensors covering that buffer exactly) plus an optional `"__metadata__"` str->str map, then the data.
Headers are parsed and checked here before any tensor is touched; tensor bytes are read by the
`safetensors` library. Pickle checkpoints are refused, never loaded.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

Index = tuple[slice, ...]
Transform = Callable[[np.ndarray], np.ndarray]

# safetensors dtype codes readable as numpy arrays (ml_dtypes supplies bfloat16).
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
}
_WRITABLE_DTYPES = frozenset(_DTYPES.values())
# readable from the header (the FP8 revision's weights); their bytes are read by cosmos_jax.convert.modelopt_fp8
_DTYPES["F8_E4M3"] = np.dtype(ml_dtypes.float8_e4m3fn)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_METADATA_KEY = "__metadata__"
_SHARD_DIGITS = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as given; the message names the file and, where known, the key."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the file header alone."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Transpose:
    """Axis permutation applied to a stored tensor (e.g. torch Linear (out, in) -> Flax (in, out): (1, 0)).

    Unlike an opaque callable it maps an output slice back to a source slice, so sharded loads read
    only the bytes each device holds.
    """

    axes: tuple[int, ...]

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return np.transpose(array, self.axes)

    def out_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the transposed tensor for a stored `shape`."""
        if sorted(self.axes) != list(range(len(shape))):
            raise ValueError(f"transpose axes {self.axes} do not permute a rank-{len(shape)} tensor {tuple(shape)}")
        return tuple(shape[a] for a in self.axes)

    def source_index(self, index: Index) -> Index:
        """The stored tensor's slice whose transpose is the output slice `index`."""
        source = [slice(None)] * len(self.axes)
        for out_axis, in_axis in enumerate(self.axes):
            source[in_axis] = index[out_axis]
        return tuple(source)


# ---------------------------------------------------------------------------------------------- headers


def _no_duplicate_keys(where: str) -> Callable[[list[tuple[str, object]]], dict[str, object]]:
    def build(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in pairs:
            if key in result:
                raise CheckpointError(f"{where}: key {key!r} appears twice in the JSON")
            result[key] = value
        return result

    return build


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, key: str, entry: object) -> tuple[TensorInfo, int, int]:
    """Validate one header entry; returns its info and (begin, end) data offsets."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: header entry must hold exactly dtype, shape, data_offsets, got {entry!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in _DTYPES:
        raise CheckpointError(
            f"{where}: unsupported dtype {code!r} (readable: {', '.join(_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be two non-negative ints, got {offsets!r}")
    begin, end = offsets
    dtype = _DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but {code}{shape} needs {nbytes}"
        )
    return TensorInfo(path, dtype, tuple(shape), nbytes), begin, end


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header: every tensor's dtype, shape and byte range.

    Raises CheckpointError naming the file (and tensor) for a truncated file, a header length past the end
    of the file, corrupt JSON, unsupported dtypes, and data offsets outside the file or not tiling it.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, shorter than the 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: header length {header_len} runs past the end of the file ({size} bytes); "
                "truncated or not a safetensors file"
            )
        if header_len > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {header_len} exceeds the {_MAX_HEADER_BYTES}-byte limit")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys(str(path)))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt JSON header (not an object)")
    metadata = header.pop(_METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: {_METADATA_KEY} must map strings to strings, got {metadata!r}")

    data_bytes = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        info, begin, end = _tensor_info(path, key, entry)
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: tensor {key!r} data_offsets [{begin}, {end}] lie outside the file's {data_bytes} data "
                "bytes (truncated or corrupt file)"
            )
        infos[key] = info
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise CheckpointError(
                f"{path}: tensor {key!r} starts at byte {begin} of the data but the previous tensor ends at {position}"
                " (overlapping or gapped data offsets)"
            )
        position = end
    if position != data_bytes:
        raise CheckpointError(f"{path}: tensors cover {position} bytes but the file holds {data_bytes} data bytes")
    return infos


# ---------------------------------------------------------------------------------------------- locating


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: pickle checkpoints (.bin/.pt/.pth/.ckpt) are refused because loading them can run arbitrary "
        "code; re-save the weights as safetensors (e.g. save_pretrained(..., safe_serialization=True))"
    )


def _is_pickle(path: Path) -> bool:
    name = path.name
    return name.endswith(_PICKLE_SUFFIXES) or name.endswith(tuple(s + ".index.json" for s in _PICKLE_SUFFIXES))


def _is_shard_name(shard: object) -> bool:
    """A `.safetensors` file name, or a relative POSIX path below the index's folder (no '..', '.', '\\')."""
    if not isinstance(shard, str) or not shard.endswith(".safetensors") or "\\" in shard:
        return False
    path = PurePosixPath(shard)
    return not path.is_absolute() and all(part not in ("..", ".") for part in path.parts) and "//" not in shard


def shard_name(file: Path, index_folder: Path) -> str:
    """How an index in `index_folder` names `file`: its POSIX path relative to that folder."""
    return file.relative_to(index_folder).as_posix()


def _read_index(index_path: Path) -> dict[str, str]:
    """The weight_map of a `*.safetensors.index.json`, each shard checked to be a file beside it or below it (a
    unified root index may name component shards such as `transformer/diffusion_pytorch_model-00001-of-00002...`)."""
    try:
        text = index_path.read_text(encoding="utf-8")
        index = json.loads(text, object_pairs_hook=_no_duplicate_keys(str(index_path)))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: corrupt index JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: index has no 'weight_map' object of tensor name -> shard file")
    for key, shard in weight_map.items():
        if not _is_shard_name(shard):
            raise CheckpointError(f"{index_path}: key {key!r} maps to {shard!r}, not a .safetensors file name "
                                  "(or a relative path below the index's folder)")
        if not (index_path.parent / shard).is_file():
            raise CheckpointError(f"{index_path}: key {key!r} names shard {shard!r}, which is missing")
    return weight_map


def _locate(path: Path) -> tuple[Path | None, list[Path]]:
    """(index file or None, safetensors files) for a folder, a single file or an index file."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if _is_pickle(path):
            _refuse_pickle(path)
        if path.name.endswith(".safetensors.index.json"):
            return path, []
        if path.name.endswith(".safetensors"):
            return None, [path]
        raise CheckpointError(f"{path}: not a .safetensors file or .safetensors.index.json")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several safetensors indexes, cannot choose: {[p.name for p in indexes]}")
    if indexes:
        return indexes[0], []
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return None, files
    if len(files) > 1:
        raise CheckpointError(f"{path}: several .safetensors files but no *.safetensors.index.json to join them")
    pickles = sorted(p for p in path.iterdir() if _is_pickle(p))
    if pickles:
        _refuse_pickle(pickles[0])
    raise CheckpointError(f"{path}: no .safetensors checkpoint in this folder")


# ---------------------------------------------------------------------------------------------- reading


def _check_index(key: str, shape: tuple[int, ...], index: Index) -> None:
    if not isinstance(index, tuple) or len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
        raise ValueError(
            f"tensor {key!r} of shape {shape}: index must be a tuple of at most {len(shape)} slices, got {index!r}"
        )
    if any(s.step is not None and s.step <= 0 for s in index):
        raise ValueError(f"tensor {key!r}: slice steps must be positive, got {index!r}")


class CheckpointIndex:
    """Every tensor of one component checkpoint (a file, or shards joined by an index), read lazily.

    Headers are validated when opened; `keys`, `shape`, `dtype` and `nbytes` never touch tensor data.
    Reads go through `safetensors.safe_open(..., framework="numpy")`, keeping bf16 as ml_dtypes bfloat16.
    Usable as a context manager; `close` releases the open files.
    """

    def __init__(self, source: Path, tensors: dict[str, TensorInfo]):
        self.source = source
        self._tensors = tensors
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder_or_file: str | os.PathLike[str]) -> CheckpointIndex:
        """Open a component folder (`*.safetensors.index.json` + shards, or one `*.safetensors`) or one file."""
        path = Path(folder_or_file)
        index_path, files = _locate(path)
        if index_path is None:
            return cls(path, read_header(files[0]))
        weight_map = _read_index(index_path)
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = index_path.parent / shard
            for key, info in read_header(shard_path).items():
                if key in tensors:
                    raise CheckpointError(
                        f"{index_path}: tensor {key!r} is stored in two shards: {tensors[key].file.name} and {shard}"
                    )
                tensors[key] = info
        for key, info in tensors.items():
            name = shard_name(info.file, index_path.parent)
            if weight_map.get(key) != name:
                raise CheckpointError(
                    f"{index_path}: shard {name} holds tensor {key!r} but the index maps it to {weight_map.get(key)!r}"
                )
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(
                f"{index_path}: index maps {missing[:5]} to {weight_map[missing[0]]} but the shard does not hold "
                f"{'them' if len(missing) > 1 else 'it'}"
            )
        return cls(path, tensors)

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the open file handles (reads after this reopen them)."""
        with self._lock:
            self._handles.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._tensors)

    @property
    def files(self) -> list[Path]:
        """The safetensors files behind this checkpoint, sorted."""
        return sorted({info.file for info in self._tensors.values()})

    def info(self, key: str) -> TensorInfo:
        """File, dtype, shape and byte size of `key` (KeyError naming the checkpoint if absent)."""
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"no tensor {key!r} in checkpoint {self.source}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self.info(key).dtype

    def nbytes(self, key: str) -> int:
        return self.info(key).nbytes

    def _handle(self, file: Path) -> object:
        handle = self._handles.get(file)
        if handle is None:
            with self._lock:
                handle = self._handles.get(file)
                if handle is None:
                    try:
                        handle = safe_open(str(file), framework="numpy")
                    except SafetensorError as e:
                        raise CheckpointError(f"{file}: safetensors refused the file ({e})") from e
                    self._handles[file] = handle
        return handle

    def read(self, key: str) -> np.ndarray:
        """The whole tensor `key`, in its stored dtype and shape."""
        info = self.info(key)
        return self._handle(info.file).get_tensor(key)

    def read_slice(self, key: str, index: Index) -> np.ndarray:
        """`tensor[index]` for a tuple of slices (one per leading axis), reading only those bytes."""
        info = self.info(key)
        _check_index(key, info.shape, index)
        if not info.shape:
            return self.read(key)
        concrete = _normalize(index, info.shape)
        sizes = [len(range(s.start, s.stop, s.step)) for s in concrete]
        if 0 in sizes:
            return np.empty(sizes, info.dtype)
        return self._handle(info.file).get_slice(key)[concrete]


def read_stacked(
    index: CheckpointIndex,
    keys: Sequence[str],
    out: np.ndarray | None = None,
    transform: Transform | None = None,
) -> np.ndarray:
    """Stack per-layer tensors `keys` into one [L, ...] buffer, each read once (and `transform`ed) into place.

    `out`, when given, must be [len(keys), ...] with the (transformed) per-layer shape and stored dtype;
    otherwise it is allocated after the first read.
    """
    if not keys:
        raise ValueError("read_stacked needs at least one key")
    stored_shape, stored_dtype = _layer_spec(index, keys)
    if out is not None and out.shape[:1] != (len(keys),):
        raise ValueError(f"out has shape {out.shape}, expected a leading axis of {len(keys)} layers")
    if out is not None and transform is None and (out.shape[1:], out.dtype) != (stored_shape, stored_dtype):
        raise CheckpointError(
            f"{index.info(keys[0]).file}: tensor {keys[0]!r} is {stored_dtype}{list(stored_shape)} but out holds "
            f"{out.dtype}{list(out.shape[1:])} per layer"
        )
    for i, key in enumerate(keys):
        layer = index.read(key)
        if transform is not None:
            layer = transform(layer)
        if out is None:
            out = np.empty((len(keys), *layer.shape), layer.dtype)
        if layer.shape != out.shape[1:] or layer.dtype != out.dtype:
            raise CheckpointError(
                f"{index.info(key).file}: tensor {key!r} gives {layer.dtype}{list(layer.shape)} for layer {i}, "
                f"expected {out.dtype}{list(out.shape[1:])} per layer of the stack"
            )
        out[i] = layer
    return out


def _layer_spec(index: CheckpointIndex, keys: Sequence[str]) -> tuple[tuple[int, ...], np.dtype]:
    """The stored shape and dtype shared by every key (CheckpointError naming the first that differs)."""
    shape, dtype = index.shape(keys[0]), index.dtype(keys[0])
    for key in keys[1:]:
        if index.shape(key) != shape or index.dtype(key) != dtype:
            raise CheckpointError(
                f"{index.info(key).file}: tensor {key!r} is {index.dtype(key)}{list(index.shape(key))}, expected "
                f"{dtype}{list(shape)} like {keys[0]!r}"
            )
    return shape, dtype


def _normalize(index: Index, shape: tuple[int, ...]) -> Index:
    """Concrete start/stop/step slices, one per axis (hashable after `slice.indices`)."""
    full = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(full, shape))


def make_sharded_array(
    index: CheckpointIndex,
    key_or_keys: str | Sequence[str],
    sharding: jax.sharding.Sharding,
    transform: Transpose | Transform | None = None,
) -> jax.Array:
    """A jax.Array placed in `sharding` whose devices each read only their own slice.

    `key_or_keys` is one tensor, or per-layer tensors stacked on a new leading axis (a device reads only
    the layers in its slice). `transform` is applied per tensor: a `Transpose` is sliced through (only the
    device's bytes are read); any other callable must be traceable by `jax.eval_shape` and sees each
    needed per-layer tensor whole, the device slice being taken afterwards. Devices asking for the same
    slice share one read.
    """
    stacked = not isinstance(key_or_keys, str)
    keys = list(key_or_keys) if stacked else [key_or_keys]
    if not keys:
        raise ValueError("make_sharded_array needs at least one key")
    stored_shape, dtype = _layer_spec(index, keys)
    if transform is None:
        layer_shape = stored_shape
    elif isinstance(transform, Transpose):
        layer_shape = transform.out_shape(stored_shape)
    else:
        out = jax.eval_shape(transform, jax.ShapeDtypeStruct(stored_shape, dtype))
        layer_shape, dtype = tuple(out.shape), np.dtype(out.dtype)
    global_shape = (len(keys), *layer_shape) if stacked else layer_shape

    def read_layer(key: str, layer_index: Index) -> np.ndarray:
        if transform is None:
            return index.read_slice(key, layer_index)
        if isinstance(transform, Transpose):
            return transform(index.read_slice(key, transform.source_index(layer_index)))
        return np.asarray(transform(index.read(key)))[layer_index]

    def slice_key(device_index: Index | None) -> tuple[tuple[int, int, int], ...]:
        return tuple((s.start, s.stop, s.step) for s in _normalize(device_index or (), global_shape))

    # Devices wanting the same slice share one read; a slice is dropped once its last device has it.
    waiting = Counter(slice_key(i) for i in sharding.addressable_devices_indices_map(global_shape).values())
    cache: dict[tuple[tuple[int, int, int], ...], np.ndarray] = {}

    def read_block(bounds: tuple[tuple[int, int, int], ...]) -> np.ndarray:
        concrete = tuple(slice(*b) for b in bounds)
        if not stacked:
            return read_layer(keys[0], concrete)
        block = np.empty([len(range(*b)) for b in bounds], dtype)
        for j, layer in enumerate(range(*bounds[0])):
            block[j] = read_layer(keys[layer], concrete[1:])
        return block

    def callback(device_index: Index | None) -> np.ndarray:
        bounds = slice_key(device_index)
        block = cache.pop(bounds, None)
        if block is None:
            block = read_block(bounds)
        waiting[bounds] -= 1
        if waiting[bounds] > 0:
            cache[bounds] = block
        return block

    return jax.make_array_from_callback(global_shape, sharding, callback, dtype=dtype)


# ---------------------------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder of `dst`; on success fsync it and rename it to `dst`.

    An existing `dst` is refused (FileExistsError) unless `overwrite`, in which case it is replaced only
    after the body succeeded. On any error the temporary folder is removed and `dst` is left as it was.
    """
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists() or dst.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{dst} appeared while it was being written; not replacing it")
            old = dst.parent / f".{dst.name}.old-{secrets.token_hex(6)}"
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            _remove(old)
        else:
            os.rename(tmp, dst)
        _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _as_array(key: object, value: object) -> tuple[str, np.ndarray]:
    if not isinstance(key, str) or not key or key == _METADATA_KEY:
        raise ValueError(f"tensor name must be a non-empty string other than {_METADATA_KEY!r}, got {key!r}")
    array = np.asarray(value, order="C")
    if array.dtype.newbyteorder("=") not in _WRITABLE_DTYPES:
        raise ValueError(f"tensor {key!r}: dtype {array.dtype} cannot be stored in safetensors by this writer")
    return key, array


class _ShardWriter:
    """Streams (key, array) pairs into shards as Hugging Face's splitter would cut them.

    Tensors accumulate until the next would push the shard past `max_shard_bytes`; a tensor larger than
    the limit goes alone into its own shard at once. Shards are written under provisional names and
    renamed when their count is known.
    """

    def __init__(self, folder: Path, weights_name: str, max_shard_bytes: int, metadata: dict[str, str]):
        self.folder, self.weights_name = folder, weights_name
        self.max_shard_bytes, self.metadata = max_shard_bytes, metadata
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.seen: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, array: np.ndarray) -> None:
        if key in self.seen:
            raise ValueError(f"tensor {key!r} given twice")
        self.seen.add(key)
        self.total_bytes += array.nbytes
        if array.nbytes > self.max_shard_bytes:
            self._write({key: array})
            return
        if self.pending and self.pending_bytes + array.nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[key] = array
        self.pending_bytes += array.nbytes

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
        self.pending, self.pending_bytes = {}, 0

    def _write(self, tensors: dict[str, np.ndarray]) -> None:
        path = self.folder / f".{self.weights_name}-{len(self.shards) + 1:0{_SHARD_DIGITS}d}.partial"
        save_file(tensors, str(path), metadata=self.metadata)
        _fsync(path)
        self.shards.append((path, list(tensors)))

    def finish(self) -> list[str]:
        """Name the shards, write the index when there are several; returns the final file names."""
        self.flush()
        if not self.shards:
            raise ValueError("no tensors to write")
        count = len(self.shards)
        if count == 1:
            names = [f"{self.weights_name}.safetensors"]
        else:
            names = [
                f"{self.weights_name}-{i:0{_SHARD_DIGITS}d}-of-{count:0{_SHARD_DIGITS}d}.safetensors"
                for i in range(1, count + 1)
            ]
        for (path, _), name in zip(self.shards, names):
            os.rename(path, self.folder / name)
        if count > 1:
            weight_map = {key: name for (_, keys), name in zip(self.shards, names) for key in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            index_path = self.folder / f"{self.weights_name}.safetensors.index.json"
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            names.append(index_path.name)
        return names


def write_checkpoint(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int,
    weights_name: str = "diffusion_pytorch_model",
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write `tensors` to `folder` in the diffusers/transformers safetensors layout, atomically.

    Produces `{weights_name}.safetensors` when everything fits one shard of `max_shard_bytes`, otherwise
    `{weights_name}-0000i-of-0000n.safetensors` shards plus `{weights_name}.safetensors.index.json`, cut
    where `save_pretrained(max_shard_size=max_shard_bytes)` would cut them. Every header carries
    `{"format": "pt"}` (plus `metadata`). Given an iterator, at most one shard is held in memory. Returns
    the file names written.
    """
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    if not weights_name or Path(weights_name).name != weights_name:
        raise ValueError(f"weights_name must be a plain file stem, got {weights_name!r}")
    header_metadata = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header_metadata.items()):
        raise ValueError(f"metadata must map strings to strings, got {metadata!r}")
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, weights_name, max_shard_bytes, header_metadata)
        for key, value in items:
            writer.add(*_as_array(key, value))
        return writer.finish()

"""Safetensors I/O: Hub-layout round trips against torch/diffusers, validation errors, sharded loads, atomic writes."""
from __future__ import annotations

import filecmp
import json
import os
import pathlib
import pickle
import struct
import weakref
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from cosmos_jax.convert.safetensors_io import (
    CheckpointError,
    CheckpointIndex,
    Transpose,
    atomic_output_dir,
    make_sharded_array,
    read_stacked,
    write_checkpoint,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors() -> dict[str, np.ndarray]:
    """fp32, bf16, int64 (and f16, bool, a scalar) tensors with distinct values."""
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.standard_normal((10, 6)).astype(np.float32),
        "layers.0.proj.weight": rng.standard_normal((6, 6)).astype(BF16),
        "layers.1.proj.weight": rng.standard_normal((6, 6)).astype(BF16),
        "position_ids": np.arange(12, dtype=np.int64).reshape(3, 4) * 1_000_000_007,
        "norm.weight": rng.standard_normal(6).astype(np.float16),
        "mask": rng.random(5) > 0.5,
        "scale": np.float32(0.125),
    }


def _torch_of(array: np.ndarray) -> torch.Tensor:
    if array.dtype == BF16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _numpy_of(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BF16)
    return tensor.numpy()


def _assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def _assert_reads(folder: Path, want: dict[str, np.ndarray]) -> None:
    with CheckpointIndex.open(folder) as index:
        assert index.keys() == sorted(want)
        for key, array in want.items():
            assert index.shape(key) == array.shape and index.dtype(key) == array.dtype
            assert index.nbytes(key) == array.nbytes
            _assert_identical(index.read(key), array)


# ---------------------------------------------------------------------------------------------- round trips


def test_single_file_and_many_shards_read_back_byte_identical(tmp_path: Path) -> None:
    tensors = _tensors()
    assert write_checkpoint(tmp_path / "one", tensors, max_shard_bytes=1 << 20) == [
        "diffusion_pytorch_model.safetensors"
    ]
    names = write_checkpoint(tmp_path / "many", iter(tensors.items()), max_shard_bytes=100)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert shards == [f"diffusion_pytorch_model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert sorted(os.listdir(tmp_path / "many")) == sorted(names)
    index = json.loads((tmp_path / "many" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(a.nbytes for a in tensors.values())} == {"total_size": 501}
    # bytes 240 | 72 | 72 | 96 | 12+5+4: the 240-byte tensor alone, then cut before passing 100
    shard_of = {k: int(v[24:29]) for k, v in index["weight_map"].items()}
    assert shard_of == {"embed.weight": 1, "layers.0.proj.weight": 2, "layers.1.proj.weight": 3,
                        "position_ids": 4, "norm.weight": 5, "mask": 5, "scale": 5}
    _assert_reads(tmp_path / "one", tensors)
    _assert_reads(tmp_path / "many", tensors)
    for shard in shards:
        with safe_open(str(tmp_path / "many" / shard), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}


def test_torch_loads_what_we_write(tmp_path: Path) -> None:
    tensors = _tensors()
    names = write_checkpoint(tmp_path / "m", tensors, max_shard_bytes=200, weights_name="model", metadata={"k": "v"})
    assert names[-1] == "model.safetensors.index.json"
    assert names[0] == f"model-00001-of-{len(names) - 1:05d}.safetensors"
    loaded: dict[str, torch.Tensor] = {}
    for shard in names[:-1]:
        loaded.update(torch_load_file(str(tmp_path / "m" / shard)))
        with safe_open(str(tmp_path / "m" / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "k": "v"}
    assert loaded.keys() == tensors.keys()
    for key, array in tensors.items():
        _assert_identical(_numpy_of(loaded[key]), array)


def test_reads_torch_saved_shards_with_a_hand_written_index(tmp_path: Path) -> None:
    tensors = _tensors()
    keys = list(tensors)
    split = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for shard, shard_keys in split.items():
        shard_tensors = {k: _torch_of(tensors[k]) for k in shard_keys}
        torch_save_file(shard_tensors, str(tmp_path / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, shard_keys in split.items() for k in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_reads(tmp_path, tensors)
    _assert_reads(tmp_path / "model.safetensors.index.json", tensors)


def _tiny_diffusers_model() -> torch.nn.Module:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class TinyModel(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 8, depth: int = 3):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(depth)])
            self.head = torch.nn.Linear(width, 2).to(torch.bfloat16)
            self.register_buffer("ids", torch.arange(width, dtype=torch.int64))

    torch.manual_seed(0)
    return TinyModel()


def test_diffusers_save_pretrained_folder_reads_and_rewrites_byte_identically(tmp_path: Path) -> None:
    model = _tiny_diffusers_model()
    model.save_pretrained(tmp_path / "ref", max_shard_size=400)
    state = {k: _numpy_of(v) for k, v in model.state_dict().items()}
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name != "config.json")
    assert len(ref_files) == 4  # three shards and the index
    _assert_reads(tmp_path / "ref", state)

    names = write_checkpoint(tmp_path / "ours", iter(state.items()), max_shard_bytes=400)
    assert sorted(names) == ref_files
    for name in names:
        assert filecmp.cmp(tmp_path / "ours" / name, tmp_path / "ref" / name, shallow=False), name


# ---------------------------------------------------------------------------------------------- bad input


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _write_raw(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _good_file(folder: Path) -> Path:
    write_checkpoint(folder, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, max_shard_bytes=1 << 20)
    return folder / "diffusion_pytorch_model.safetensors"


def _truncated(tmp: Path) -> tuple[Path, str]:
    path = _good_file(tmp / "c")
    path.write_bytes(path.read_bytes()[:-5])
    return path, "'w' data_offsets [0, 24] lie outside the file's 19 data bytes"


def _shorter_than_prefix(tmp: Path) -> tuple[Path, str]:
    path = tmp / "x.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    return path, "truncated file (3 bytes"


def _corrupt_json(tmp: Path) -> tuple[Path, str]:
    path = tmp / "x.safetensors"
    raw = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    return path, "corrupt JSON header"


def _header_past_end(tmp: Path) -> tuple[Path, str]:
    path = _write_raw(tmp / "x.safetensors", {"w": _entry("F32", [1], 0, 4)}, b"\0" * 4, header_len=10**6)
    return path, "header length 1000000 runs past the end of the file"


def _offsets_outside(tmp: Path) -> tuple[Path, str]:
    header = {"w": _entry("F32", [2], 4, 12), "v": _entry("F32", [1], 0, 4)}
    return _write_raw(tmp / "x.safetensors", header, b"\0" * 8), "'w' data_offsets [4, 12] lie outside"


def _offsets_overlap(tmp: Path) -> tuple[Path, str]:
    header = {"w": _entry("F32", [2], 0, 8), "v": _entry("F32", [1], 4, 8)}
    return _write_raw(tmp / "x.safetensors", header, b"\0" * 8), "tensor 'v' starts at byte 4"


def _size_mismatch(tmp: Path) -> tuple[Path, str]:
    path = _write_raw(tmp / "x.safetensors", {"w": _entry("BF16", [3], 0, 4)}, b"\0" * 4)
    return path, "'w': data_offsets [0, 4] span 4 bytes but BF16[3] needs 6"


def _duplicate_header_key(tmp: Path) -> tuple[Path, str]:
    path = tmp / "x.safetensors"
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = f'{{"w": {entry}, "w": {entry}}}'.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    return path, "key 'w' appears twice"


def _unsupported_dtype(tmp: Path) -> tuple[Path, str]:
    path = tmp / "x.safetensors"
    torch_save_file({"fp8": torch.ones(4, dtype=torch.float8_e5m2)}, str(path))
    return path, "tensor 'fp8': unsupported dtype 'F8_E5M2'"


def _sharded(tmp: Path, weight_map: dict[str, str], shards: dict[str, dict[str, np.ndarray]]) -> Path:
    folder = tmp / "sharded"
    folder.mkdir()
    for shard, tensors in shards.items():
        torch_save_file({k: _torch_of(v) for k, v in tensors.items()}, str(folder / shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


ONE = np.ones(2, np.float32)


def _missing_shard(tmp: Path) -> tuple[Path, str]:
    folder = _sharded(tmp, {"a": "s1.safetensors", "b": "s2.safetensors"}, {"s1.safetensors": {"a": ONE}})
    return folder, "key 'b' names shard 's2.safetensors', which is missing"


def _key_in_two_shards(tmp: Path) -> tuple[Path, str]:
    shards = {"s1.safetensors": {"a": ONE, "b": ONE}, "s2.safetensors": {"b": ONE}}
    folder = _sharded(tmp, {"a": "s1.safetensors", "b": "s2.safetensors"}, shards)
    return folder, "tensor 'b' is stored in two shards: s1.safetensors and s2.safetensors"


def _index_disagrees(tmp: Path) -> tuple[Path, str]:
    shards = {"s1.safetensors": {"a": ONE, "c": ONE}, "s2.safetensors": {"b": ONE}}
    folder = _sharded(tmp, {"a": "s2.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}, shards)
    return folder, "shard s1.safetensors holds tensor 'a' but the index maps it to 's2.safetensors'"


def _index_key_absent(tmp: Path) -> tuple[Path, str]:
    shards = {"s1.safetensors": {"a": ONE}}
    folder = _sharded(tmp, {"a": "s1.safetensors", "ghost": "s1.safetensors"}, shards)
    return folder, "index maps ['ghost'] to s1.safetensors but the shard does not hold it"


def _index_path_escape(tmp: Path) -> tuple[Path, str]:
    folder = _sharded(tmp, {"a": "../s1.safetensors"}, {"s1.safetensors": {"a": ONE}})
    return folder, "key 'a' maps to '../s1.safetensors', not a .safetensors file name"


def _corrupt_index(tmp: Path) -> tuple[Path, str]:
    folder = _sharded(tmp, {"a": "s1.safetensors"}, {"s1.safetensors": {"a": ONE}})
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return folder, "model.safetensors.index.json: corrupt index JSON"


def _ambiguous_files(tmp: Path) -> tuple[Path, str]:
    folder = _sharded(tmp, {"a": "s1.safetensors"}, {"s1.safetensors": {"a": ONE}, "s2.safetensors": {"b": ONE}})
    (folder / "model.safetensors.index.json").unlink()
    return folder, "several .safetensors files but no *.safetensors.index.json"


def _empty_folder(tmp: Path) -> tuple[Path, str]:
    (tmp / "empty").mkdir()
    return tmp / "empty", "no .safetensors checkpoint in this folder"


BAD_INPUTS = {
    "truncated": _truncated,
    "shorter_than_prefix": _shorter_than_prefix,
    "corrupt_json": _corrupt_json,
    "header_past_end": _header_past_end,
    "offsets_outside": _offsets_outside,
    "offsets_overlap": _offsets_overlap,
    "size_mismatch": _size_mismatch,
    "duplicate_header_key": _duplicate_header_key,
    "unsupported_dtype": _unsupported_dtype,
    "missing_shard": _missing_shard,
    "key_in_two_shards": _key_in_two_shards,
    "index_disagrees": _index_disagrees,
    "index_key_absent": _index_key_absent,
    "index_path_escape": _index_path_escape,
    "corrupt_index": _corrupt_index,
    "ambiguous_files": _ambiguous_files,
    "empty_folder": _empty_folder,
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_checkpoint_raises_checkpoint_error_naming_file_and_key(tmp_path: Path, case: str) -> None:
    path, expected = BAD_INPUTS[case](tmp_path)
    with pytest.raises(CheckpointError) as info:
        CheckpointIndex.open(path)
    message = str(info.value)
    assert expected in message
    named = path if path.is_file() else path / "model.safetensors.index.json"
    assert str(named) in message or str(path) in message
    assert isinstance(info.value, ValueError)


class _TouchOnUnpickle:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_checkpoints_are_refused_and_never_unpickled(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / "component"
    folder.mkdir()
    (folder / name).write_bytes(pickle.dumps({"w": _TouchOnUnpickle(marker)}))
    for target in (folder, folder / name):
        with pytest.raises(CheckpointError, match="pickle checkpoints .* are refused") as info:
            CheckpointIndex.open(target)
        assert name in str(info.value)
    assert not marker.exists()


def test_unknown_key_and_bad_slice_are_clear_errors(tmp_path: Path) -> None:
    index = CheckpointIndex.open(_good_file(tmp_path / "c"))
    with pytest.raises(KeyError, match="no tensor 'nope' in checkpoint"):
        index.read("nope")
    with pytest.raises(ValueError, match="index must be a tuple of at most 2 slices"):
        index.read_slice("w", (0,))
    with pytest.raises(ValueError, match="slice steps must be positive"):
        index.read_slice("w", (slice(None, None, -1),))


def test_writer_rejects_duplicate_keys_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tensor 'a' given twice"):
        write_checkpoint(tmp_path / "dst", [("a", ONE), ("a", ONE)], max_shard_bytes=100)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- slices and stacks


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> tuple[CheckpointIndex, np.ndarray]:
    """A bf16 [6, 7, 8] tensor in a three-shard checkpoint."""
    array = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8).astype(BF16)
    folder = tmp_path_factory.mktemp("cube") / "ckpt"
    write_checkpoint(folder, {"a": ONE, "cube": array, "z": ONE}, max_shard_bytes=8)
    return CheckpointIndex.open(folder), array


_bounds = st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(1, 3))


@given(st.lists(_bounds, min_size=0, max_size=3))
def test_read_slice_equals_numpy_slicing(cube: tuple[CheckpointIndex, np.ndarray], bounds: list) -> None:
    index, array = cube
    slices = tuple(slice(start, stop, step) for start, stop, step in bounds)
    _assert_identical(index.read_slice("cube", slices), array[slices])


def test_read_slice_reads_the_requested_values(cube: tuple[CheckpointIndex, np.ndarray]) -> None:
    index, _ = cube
    got = index.read_slice("cube", (slice(2, 4), slice(5, 6), slice(1, 8, 3)))
    # element (i, j, k) holds 56 i + 8 j + k, exact in bf16 below 256
    np.testing.assert_array_equal(got.astype(np.float32), [[[153, 156, 159]], [[209, 212, 215]]])
    assert got.dtype == BF16


def test_read_stacked_fills_the_given_buffer_once_per_layer(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    layers = {f"layers.{i}.w": rng.standard_normal((3, 5)).astype(BF16) for i in range(4)}
    write_checkpoint(tmp_path / "c", layers, max_shard_bytes=40)
    index = CheckpointIndex.open(tmp_path / "c")
    out = np.zeros((4, 5, 3), BF16)
    got = read_stacked(index, list(layers), out=out, transform=Transpose((1, 0)))
    assert got is out
    _assert_identical(out, np.stack([w.T for w in layers.values()]))
    _assert_identical(read_stacked(index, list(layers)), np.stack(list(layers.values())))
    with pytest.raises(CheckpointError, match=r"'layers.2.w' is bfloat16\[3, 5\] but out holds bfloat16\[5, 3\]"):
        read_stacked(index, ["layers.2.w"], out=np.zeros((1, 5, 3), BF16))
    mismatch = r"'layers.0.w' gives bfloat16\[5, 3\] for layer 0, expected float32\[5, 3\] per layer"
    with pytest.raises(CheckpointError, match=mismatch):
        read_stacked(index, ["layers.0.w", "layers.1.w"], out=np.zeros((2, 5, 3), np.float32), transform=np.transpose)
    with pytest.raises(KeyError, match="no tensor 'layers.9.w'"):
        read_stacked(index, ["layers.0.w", "layers.9.w"])


# ---------------------------------------------------------------------------------------------- sharded loads


class _RecordingIndex(CheckpointIndex):
    """Records every read so tests can see which bytes each device asked for."""

    def __init__(self, *args: object):
        super().__init__(*args)
        self.reads: list[tuple[str, tuple[tuple[int, int, int], ...] | None]] = []

    def read(self, key: str) -> np.ndarray:
        self.reads.append((key, None))
        return super().read(key)

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        self.reads.append((key, tuple((s.start, s.stop, s.step) for s in index)))
        return super().read_slice(key, index)


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    assert jax.device_count() == 8
    return jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    tensors = {f"layers.{i}.w": rng.standard_normal((3, 16)).astype(BF16) for i in range(8)}
    tensors["embed"] = rng.standard_normal((16, 6)).astype(np.float32)
    folder = tmp_path_factory.mktemp("stack") / "ckpt"
    write_checkpoint(folder, tensors, max_shard_bytes=200)
    return folder, tensors


def _assert_each_device_holds_its_shard(array: jax.Array, want: np.ndarray) -> None:
    assert array.shape == want.shape and array.dtype == want.dtype
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
        _assert_identical(np.asarray(shard.data), want[shard.index])
    _assert_identical(np.asarray(array), want)


def test_sharded_single_key_reads_only_each_devices_rows(mesh: jax.sharding.Mesh, stack: tuple) -> None:
    folder, tensors = stack
    index = _RecordingIndex.open(folder)
    array = make_sharded_array(index, "embed", NamedSharding(mesh, P("fsdp", None)))
    _assert_each_device_holds_its_shard(array, tensors["embed"])
    assert sorted(index.reads) == [("embed", ((2 * i, 2 * i + 2, 1), (0, 6, 1))) for i in range(8)]


def test_sharded_stack_reads_only_each_devices_layer(mesh: jax.sharding.Mesh, stack: tuple) -> None:
    folder, tensors = stack
    keys = [f"layers.{i}.w" for i in range(8)]
    index = _RecordingIndex.open(folder)
    array = make_sharded_array(index, keys, NamedSharding(mesh, P("fsdp", None, None)))
    _assert_each_device_holds_its_shard(array, np.stack([tensors[k] for k in keys]))
    assert sorted(index.reads) == [(k, ((0, 3, 1), (0, 16, 1))) for k in keys]


def test_sharded_transposed_stack_reads_only_each_devices_columns(mesh: jax.sharding.Mesh, stack: tuple) -> None:
    folder, tensors = stack
    keys = [f"layers.{i}.w" for i in range(8)]
    index = _RecordingIndex.open(folder)
    # stored [3, 16] per layer, loaded [8 layers, 16, 3]; the 16 axis split 8 ways
    array = make_sharded_array(index, keys, NamedSharding(mesh, P(None, "fsdp", None)), transform=Transpose((1, 0)))
    _assert_each_device_holds_its_shard(array, np.stack([tensors[k].T for k in keys]))
    expected = [(k, ((0, 3, 1), (2 * d, 2 * d + 2, 1))) for k in keys for d in range(8)]
    assert sorted(index.reads) == sorted(expected)


def test_sharded_replicated_array_is_read_once(mesh: jax.sharding.Mesh, stack: tuple) -> None:
    folder, tensors = stack
    index = _RecordingIndex.open(folder)
    array = make_sharded_array(index, "embed", NamedSharding(mesh, P()), transform=lambda x: x.T * 2)
    _assert_each_device_holds_its_shard(array, tensors["embed"].T * 2)
    assert index.reads == [("embed", None)]


# ---------------------------------------------------------------------------------------------- atomic writes


def _failing_stream(fail_after: int):
    for i in range(10):
        if i == fail_after:
            raise RuntimeError("disk on fire")
        yield f"t{i}", np.full((4,), i, np.float32)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(tmp_path / "dst", _failing_stream(5), max_shard_bytes=20)  # two shards written before
    assert os.listdir(tmp_path) == []


def test_streaming_write_holds_at_most_one_shard(tmp_path: Path) -> None:
    alive: list[weakref.ref] = []
    peak = 0

    def stream():
        nonlocal peak
        for i in range(20):
            peak = max(peak, sum(ref().nbytes for ref in alive if ref() is not None))
            array = np.full((25,), i, np.float32)  # 100 bytes
            alive.append(weakref.ref(array))
            yield f"t{i}", array
            del array

    names = write_checkpoint(tmp_path / "dst", stream(), max_shard_bytes=300)
    assert peak == 300  # three tensors pending, never the 2000 bytes of the whole stream
    assert len(names) == 8 and names[0] == "diffusion_pytorch_model-00001-of-00007.safetensors"
    with CheckpointIndex.open(tmp_path / "dst") as index:
        _assert_identical(index.read("t19"), np.full((25,), 19, np.float32))


def test_existing_destination_is_refused_unless_overwrite(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    write_checkpoint(dst, {"old": ONE}, max_shard_bytes=100)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        write_checkpoint(dst, {"new": ONE}, max_shard_bytes=100)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(dst, _failing_stream(3), max_shard_bytes=20, overwrite=True)
    assert CheckpointIndex.open(dst).keys() == ["old"]
    write_checkpoint(dst, _failing_stream(10), max_shard_bytes=20, overwrite=True)
    with CheckpointIndex.open(dst) as index:
        assert index.keys() == [f"t{i}" for i in range(10)]
        _assert_identical(index.read("t7"), np.full((4,), 7, np.float32))
    assert os.listdir(tmp_path) == ["dst"]


def test_atomic_output_dir_renames_on_success_only(tmp_path: Path) -> None:
    dst = tmp_path / "out" / "orbax"
    with atomic_output_dir(dst) as tmp:
        assert tmp.parent == dst.parent and not dst.exists()
        (tmp / "item").mkdir()
        (tmp / "item" / "x").write_text("1")
    assert (dst / "item" / "x").read_text() == "1"
    with pytest.raises(KeyError):
        with atomic_output_dir(dst, overwrite=True) as tmp:
            (tmp / "y").write_text("2")
            raise KeyError("boom")
    assert sorted(os.listdir(dst.parent)) == ["orbax"] and os.listdir(dst) == ["item"]

"""The converted checkpoint folder: one orbax checkpoint per parameter tree, plus the configs, written atomically.

Layout written by `write_converted` (configs keep the Hub's paths, so the same readers serve both layouts):

    DST/cosmos_jax.json                  marker: format, version, per-tree statistics
    DST/orbax/{reasoner,generator,vae,sound_tokenizer,root_reasoner}/   one orbax (OCDBT) checkpoint per tree
                                         present (root_reasoner: what the root reasoner files add, see load.py)
    DST/transformer/config.json          Cosmos3Config.to_json (the reference's keys)
    DST/model_index.json, vae/config.json, sound_tokenizer/config.json, scheduler/scheduler_config.json,
    DST/text_tokenizer/, root config.json and other root files: copied verbatim from the source

Trees are written leaf group by leaf group (orbax partial saves, finalized once), so a writer fed from an
iterator holds only the current group in memory: one stacked layer parameter, or small leaves up to
`group_bytes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.safetensors_io import atomic_output_dir

MARKER = "cosmos_jax.json"
FORMAT = "cosmos-jax-converted"
VERSION = 1
ORBAX_DIR = "orbax"
TREES = ("reasoner", "generator", "vae", "sound_tokenizer", "root_reasoner")
DEFAULT_GROUP_BYTES = 64 * 2**20

LeafPath = tuple[str, ...]
Leaf = tuple[LeafPath, np.ndarray]


class ConvertedCheckpointError(ValueError):
    """A converted folder is incomplete or does not match its configs; the message names the file."""


@dataclasses.dataclass
class TreeStats:
    """What was written for one tree: parameter count, bytes and parameters per dtype name."""

    parameters: int = 0
    nbytes: int = 0
    dtypes: Counter = dataclasses.field(default_factory=Counter)

    def add(self, array: np.ndarray) -> None:
        self.parameters += int(array.size)
        self.nbytes += int(array.nbytes)
        self.dtypes[str(array.dtype)] += int(array.size)

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "bytes": self.nbytes, "dtypes": dict(self.dtypes)}


def is_converted(folder: str | os.PathLike[str]) -> bool:
    """True when `folder` was written by `write_converted`."""
    return (Path(folder) / MARKER).is_file()


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The marker's content, checked for format and version."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertedCheckpointError(f"{path}: unreadable converted-checkpoint marker ({e})") from e
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise ConvertedCheckpointError(
            f"{path}: not a {FORMAT} version {VERSION} marker (got format={marker.get('format')!r}, "
            f"version={marker.get('version')!r})" if isinstance(marker, dict) else f"{path}: marker is not an object"
        )
    return marker


def _nest(leaves: Sequence[Leaf]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in leaves:
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _nbytes(value: Any) -> int:
    return int(np.prod(value.shape, dtype=np.int64)) * np.dtype(value.dtype).itemsize


def _groups(leaves: Iterable[Leaf], group_bytes: int) -> Iterator[list[Leaf]]:
    """Consecutive leaves (arrays or ShapeDtypeStructs) batched up to `group_bytes`; a leaf at least that large
    goes alone. A group is handed on as soon as it is full, before the next leaf is produced."""
    group: list[Leaf] = []
    size = 0
    for path, value in leaves:
        if group and size + _nbytes(value) > group_bytes:
            yield group
            group, size = [], 0
        group.append((path, value))
        size += _nbytes(value)
        del value
        if size >= group_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def save_tree(
    folder: Path,
    leaves: Iterable[Leaf],
    *,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    on_leaf: Callable[[LeafPath, np.ndarray], None] | None = None,
) -> TreeStats:
    """Write (path, numpy array) leaves as one orbax checkpoint at `folder` (which must not exist).

    Leaves are consumed lazily and saved in groups; each group is released once written (no generator in
    the chain keeps a reference to a leaf it has handed on).
    """
    stats = TreeStats()
    seen: set[LeafPath] = set()
    written = False

    def checked(items: Iterable[Leaf]) -> Iterator[Leaf]:
        for path, value in items:
            if path in seen:
                raise ValueError(f"{folder}: leaf {'/'.join(path)} given twice")
            seen.add(path)
            value = np.asarray(value)
            stats.add(value)
            if on_leaf is not None:
                on_leaf(path, value)
            yield path, value
            del value

    with _writer_context():
        for group in _groups(checked(leaves), group_bytes):
            ocp.partial.save(folder, _nest(group))
            written = True
            del group  # release this group before the next one is produced
        if not written:
            raise ValueError(f"{folder}: no leaves to write")
        ocp.partial.finalize(folder)
    return stats


def _writer_context() -> ocp.Context:
    """Orbax options for streaming writes: no defensive deep copy of host arrays (each group is handed over
    and never mutated), no compression (bf16 weights barely compress and zstd buffers a copy)."""
    context = ocp.Context()
    context.memory.deepcopy_host_arrays = False
    context.array.saving.use_compression = False
    return context


@contextlib.contextmanager
def _orbax_log() -> Iterator[list[str]]:
    """Collect (instead of printing) what orbax logs through absl while the block runs."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("absl")
    handler, propagate = Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _damaged_file(text: str) -> str | None:
    """The last local file TensorStore names in an error text, e.g. `.../state/d/b851a4...`."""
    files = re.findall(r'local file "([^"]+)"', text)
    files = [f for f in files if not f.endswith("/")] or files
    return files[-1] if files else None


def tree_shapes(folder: Path) -> dict[LeafPath, tuple[tuple[int, ...], np.dtype]]:
    """{leaf path: (shape, dtype)} of a saved tree, from its metadata only."""
    if not folder.is_dir():
        raise ConvertedCheckpointError(f"{folder}: missing orbax checkpoint")
    with _orbax_log() as log:
        try:
            metadata = ocp.metadata(folder).metadata
        except Exception as e:  # orbax raises several types for a damaged checkpoint
            raise ConvertedCheckpointError(f"{folder}: unreadable orbax checkpoint metadata "
                                           f"({_damaged_file(str(e)) or e})") from e
    if metadata is None:  # orbax logs the reason and returns None
        damaged = _damaged_file("\n".join(log)) or "a file under state/"
        raise ConvertedCheckpointError(f"{folder}: damaged orbax tree, cannot read {damaged}; convert the model again")
    flat, _ = jax.tree_util.tree_flatten_with_path(metadata)
    return {tuple(str(k.key) for k in keys): (tuple(m.shape), np.dtype(m.dtype)) for keys, m in flat}


def _restore_in_groups(folder: Path, abstract: Any, group_bytes: int) -> dict[str, Any]:
    """`abstract` (nested dicts of ShapeDtypeStructs) restored a group of leaves at a time (orbax partial loads),
    so only one group's read buffers are live besides the arrays already placed."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [(tuple(str(k.key) for k in keys), leaf) for keys, leaf in flat]
    restored: list[tuple[LeafPath, Any]] = []
    context = ocp.Context()
    context.pytree.loading.partial_load = True
    for group in _groups(leaves, group_bytes):
        with context:
            tree = ocp.load(folder, _nest(group))
        for path, _ in group:
            node = tree
            for name in path:
                node = node[name]
            restored.append((path, node))
        del tree
    return _nest(restored)


def restore_tree(folder: Path, abstract: Any | None = None, *, group_bytes: int = DEFAULT_GROUP_BYTES) -> Any:
    """The tree saved at `folder`: numpy arrays as stored, or, given nested dicts of `jax.ShapeDtypeStruct`
    (each with a `sharding`), jax.Arrays cast to those dtypes and placed in those shardings, read in groups of
    leaves of at most `group_bytes` (a leaf that large alone)."""
    if not folder.is_dir():
        raise ConvertedCheckpointError(f"{folder}: missing orbax checkpoint")
    try:
        return ocp.load(folder, None) if abstract is None else _restore_in_groups(folder, abstract, group_bytes)
    except Exception as e:  # TensorStore raises ValueError / RuntimeError variants for damaged data
        what = re.search(r'in "([^"]+)" in OCDBT', str(e))
        leaf = f"leaf {what.group(1).split('/c/')[0]}" if what else "a leaf"
        raise ConvertedCheckpointError(f"{folder}: damaged orbax tree, cannot read {leaf} "
                                       f"({str(e).splitlines()[0][:160]}); convert the model again") from None


class LeafReader:
    """Reads the leaves of one saved tree one at a time (orbax partial loads), holding only the last one read."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shapes = tree_shapes(folder)
        self._path: LeafPath | None = None
        self._value: np.ndarray | None = None

    def read(self, path: LeafPath) -> np.ndarray:
        """The leaf at `path` as stored (numpy); the previously read leaf is released first."""
        if path != self._path:
            if path not in self.shapes:
                raise ConvertedCheckpointError(f"{self.folder}: no leaf {'/'.join(path)}")
            self._path, self._value = None, None
            shape, dtype = self.shapes[path]
            context = ocp.Context()
            context.pytree.loading.partial_load = True
            with context:
                tree = ocp.load(self.folder, _nest([(path, np.empty(shape, dtype))]))
            for name in path:
                tree = tree[name]
            self._path, self._value = path, np.asarray(tree)
        return self._value


@dataclasses.dataclass(frozen=True)
class LazyLeaf:
    """A saved leaf read on access: `leaf[i]` (a copy) or `np.asarray(leaf)`; see `lazy_tree`."""

    reader: LeafReader
    path: LeafPath

    @property
    def shape(self) -> tuple[int, ...]:
        return self.reader.shapes[self.path][0]

    @property
    def dtype(self) -> np.dtype:
        return self.reader.shapes[self.path][1]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.array(self.reader.read(self.path)[index])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        value = self.reader.read(self.path)
        return value if dtype is None else value.astype(dtype)


def lazy_tree(folder: Path) -> dict[str, Any]:
    """The saved tree at `folder` as nested dicts of `LazyLeaf`s sharing one reader: walking it leaf by leaf holds
    one leaf in memory at a time (for streaming exports)."""
    reader = LeafReader(folder)
    return _nest([(path, LazyLeaf(reader, path)) for path in reader.shapes])


def _copy(src: Path, dst: Path) -> None:
    """Copy a file, or a folder without the weight files in it (a root index may name e.g. a ViT folder's)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    else:
        shutil.copyfile(src, dst)


def write_converted(
    dst: str | os.PathLike[str],
    trees: Mapping[str, Iterable[Leaf]],
    *,
    transformer_config: Cosmos3Config,
    source: Path,
    copy_paths: Sequence[str],
    overwrite: bool = False,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    on_leaf: Callable[[str, LeafPath, np.ndarray], None] | None = None,
    marker_fields: Mapping[str, Any] | None = None,
) -> dict[str, TreeStats]:
    """Write a converted folder at `dst` atomically (nothing at `dst` unless everything succeeded).

    trees: tree name (one of TREES) -> lazily produced (path, array) leaves.
    copy_paths: files or folders, relative to `source`, copied verbatim (configs, tokenizer, root files).
    marker_fields: extra JSON-serialisable entries of the marker (e.g. what the root reasoner files held).
    """
    unknown = sorted(set(trees) - set(TREES))
    if unknown:
        raise ValueError(f"unknown tree name(s) {unknown}; expected some of {TREES}")
    reserved = sorted(set(marker_fields or {}) & {"format", "version", "source", "trees"})
    if reserved:
        raise ValueError(f"marker_fields may not override {reserved}")
    stats: dict[str, TreeStats] = {}
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        for rel in copy_paths:
            _copy(source / rel, tmp / rel)
        (tmp / "transformer").mkdir(exist_ok=True)
        transformer_config.to_json(tmp / "transformer" / "config.json")
        (tmp / ORBAX_DIR).mkdir()
        for name, leaves in trees.items():
            callback = None if on_leaf is None else (lambda path, value, name=name: on_leaf(name, path, value))
            stats[name] = save_tree(tmp / ORBAX_DIR / name, leaves, group_bytes=group_bytes, on_leaf=callback)
        marker = {
            "format": FORMAT,
            "version": VERSION,
            "source": str(source),
            "trees": {name: s.to_dict() for name, s in stats.items()},
            **(marker_fields or {}),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return stats

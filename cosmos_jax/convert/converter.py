"""`convert`: a Hub-layout (safetensors) folder -> a converted (orbax) folder (the library behind `cosmos-jax convert`).

The transformer and the root reasoner files are streamed one stacked parameter at a time (read, transposed,
cast, written, released); the VAE and sound tokenizer are small and converted whole. The root reasoner files
become the `root_reasoner` tree: the ViT, plus the language tower only when it differs from the transformer's
(see cosmos_jax.convert.load). With `quantize`, the transformer's layer linears are stored quantized, each as it
streams in (values and scales, `cosmos_jax.convert.quantize.stored_leaves`), and the marker records the mode, so
`load` returns the quantized tree without reading full-precision weights. Nothing appears at DST unless
everything succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert import keymap_reasoner, orbax_io
from cosmos_jax.convert.keymap_audio import audio_params_from_torch_state
from cosmos_jax.convert.keymap_vae import vae_params_from_torch_state
from cosmos_jax.convert.quantize import check_mode, stored_leaves
from cosmos_jax.convert.safetensors_io import CheckpointIndex
from cosmos_jax.convert.load import (
    QUANTIZE_MARKER_KEY,
    ROOT_MARKER_KEY,
    ROOT_TREE,
    TRANSFORMER_TREES,
    Layout,
    Progress,
    has_root_reasoner,
    iter_transformer_leaves,
    locate,
    params_from_state,
    resolve_root_reasoner,
    read_reasoner_config,
    read_sound_config,
    read_state,
    read_vae_config,
    root_parts,
)

_COMPONENT_DIRS = ("transformer", "vae", "sound_tokenizer", "scheduler", "text_tokenizer", orbax_io.ORBAX_DIR)
_WEIGHT_SUFFIXES = (
    ".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl",
)


@dataclasses.dataclass
class ConvertSummary:
    """Per-tree statistics, bytes read from SRC and wall time of one conversion."""

    trees: dict[str, orbax_io.TreeStats]
    bytes_read: int
    tensors_read: int
    seconds: float


def _copy_paths(root: Path, transformer_dir: Path) -> list[str]:
    """Config and tokenizer files carried over verbatim (weights and the transformer folder excluded)."""
    if transformer_dir == root:
        return []
    paths = [
        p.name for p in sorted(root.iterdir())
        if (p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name != orbax_io.MARKER)
        or (p.is_dir() and p.name not in _COMPONENT_DIRS and not p.name.startswith("."))
    ]
    for name, file in (("vae", "config.json"), ("sound_tokenizer", "config.json")):
        if (root / name / file).is_file():
            paths.append(f"{name}/{file}")
    paths += [name for name in ("scheduler", "text_tokenizer") if (root / name).is_dir()]
    return paths


def _tree_leaves(
    leaves: Iterator[tuple[str, tuple[str, ...], np.ndarray]], quantize: str | None = None,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(tree, path, array) -> (path, array) as stored (quantized kernels as their values and scales), holding no
    leaf once it is handed on."""
    for tree, path, array in leaves:
        stored = stored_leaves((tree, *path), array, quantize)
        del array
        for full_path, value in stored:
            yield full_path[1:], value
            del value
        del stored


def _flat(tree: Any) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for keys, leaf in flat:
        yield tuple(str(k.key) for k in keys), np.asarray(leaf)


def _component_leaves(folder: Path, config_reader: Callable[[Path], Any], from_state: Callable[..., Any],
                      progress: Progress | None) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    config = config_reader(folder / "config.json")
    yield from _flat(params_from_state(folder, read_state(folder, progress), config, from_state))


def planned_bytes(src: str | os.PathLike[str]) -> tuple[int, int]:
    """(tensor count, bytes) that `convert` will read from `src`, from headers only. Of the root reasoner files only
    the ViT is counted: their language tower is read on top when it differs from the transformer's."""
    layout = locate(src)
    folders = [layout.transformer_dir] + [f for f in (layout.component("vae"), layout.component("sound_tokenizer"))
                                          if f is not None]
    folders += [layout.root] if has_root_reasoner(layout) else []
    count = size = 0
    for folder in folders:
        with CheckpointIndex.open(folder) as index:
            keys = [k for k in index.keys() if folder != layout.root or keymap_reasoner.is_vision_key(k)]
            count += len(keys)
            size += sum(index.nbytes(k) for k in keys)
    return count, size


def _root_reasoner_tree(layout: Layout, transformer: CheckpointIndex, config: Cosmos3Config, dtype: Any,
                        stack: contextlib.ExitStack, progress: Progress
                        ) -> tuple[Iterator[tuple[tuple[str, ...], np.ndarray]] | None, dict[str, Any]]:
    """(leaves of the root_reasoner tree or None when it has none, the marker entry) for the root files."""
    reasoner_config = read_reasoner_config(layout.root)
    root = stack.enter_context(CheckpointIndex.open(layout.root))
    contents, resolved, lm_from = resolve_root_reasoner(root, reasoner_config, transformer, config)
    marker = {"language_model_from": lm_from, "contents": contents.to_dict()}
    parts = root_parts(lm_from)
    table = keymap_reasoner.tensor_table(reasoner_config, parts)
    if not table:
        return None, marker
    stored_keys = {t.path: [resolved[k] for k in t.keys()] for t in table}

    def leaves() -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
        for path, array in keymap_reasoner.iter_params(root, reasoner_config, resolved, dtype, parts):
            for key in stored_keys[path]:
                progress(key, root.nbytes(key))
            yield path, array
            del array

    return leaves(), marker


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: Any = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    quantize: str | None = None,
) -> ConvertSummary:
    """Convert the Hub-layout folder `src` into a converted folder `dst` (see cosmos_jax.convert.orbax_io).

    dtype: transformer and root reasoner weight dtype (time embedder always f32); None (default) keeps the stored
    dtypes, so `export` gives back byte-identical tensors.
    quantize: None, "int8" or "fp8": the transformer's layer linears are stored quantized (from the weights in
    `dtype`, scales in that dtype); such a folder loads for generation only, with the same `quantize`.
    A quantized source (a `quantization_config` in the transformer's config.json: ModelOpt's FP8 revision) is
    refused with a ValueError saying to load it as it is.
    """
    start = time.perf_counter()
    check_mode(quantize, "quantize")
    layout = locate(src)
    if layout.converted:
        raise ValueError(f"{src} is already a converted folder")
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    config = Cosmos3Config.from_json(layout.transformer_dir / "config.json")
    if config.extra.get("quantization_config") is not None:
        raise ValueError(f"{layout.transformer_dir} is a quantized checkpoint (its config.json has a "
                         "quantization_config, as ModelOpt's FP8 revision does); convert does not store it: load "
                         "the folder as it is (generate/sdg/serve --model), or convert the full-precision "
                         "revision, with --quantize fp8 for stored fp8 weights")
    read = {"bytes": 0, "tensors": 0}

    def counted(key: str, nbytes: int) -> None:
        read["bytes"] += nbytes
        read["tensors"] += 1
        if progress is not None:
            progress(key, nbytes)

    with contextlib.ExitStack() as stack:
        index = stack.enter_context(CheckpointIndex.open(layout.transformer_dir))
        trees: dict[str, Any] = {
            tree: _tree_leaves(iter_transformer_leaves(index, config, dtype, counted, (tree,)), quantize)
            for tree in TRANSFORMER_TREES
        }
        for name, reader, from_state in (("vae", read_vae_config, vae_params_from_torch_state),
                                         ("sound_tokenizer", read_sound_config, audio_params_from_torch_state)):
            folder = layout.component(name)
            if folder is not None:
                trees[name] = _component_leaves(folder, reader, from_state, counted)
        marker_fields: dict[str, Any] = {} if quantize is None else {QUANTIZE_MARKER_KEY: quantize}
        if has_root_reasoner(layout):
            leaves, marker_fields[ROOT_MARKER_KEY] = _root_reasoner_tree(layout, index, config, dtype, stack, counted)
            if leaves is not None:
                trees[ROOT_TREE] = leaves
        stats = orbax_io.write_converted(
            dst, trees, transformer_config=config, source=layout.root,
            copy_paths=_copy_paths(layout.root, layout.transformer_dir), overwrite=overwrite,
            marker_fields=marker_fields,
        )
    return ConvertSummary(stats, read["bytes"], read["tensors"], time.perf_counter() - start)


def format_summary(summary: ConvertSummary) -> str:
    """A plain-text table: parameters, dtypes and size per tree, then totals and throughput."""
    lines = [f"{'tree':<16} {'parameters':>14} {'size':>12}  dtypes"]
    for name, s in summary.trees.items():
        dtypes = ", ".join(f"{d}: {n:,}" for d, n in sorted(s.dtypes.items()))
        lines.append(f"{name:<16} {s.parameters:>14,} {s.nbytes / 2**20:>9.1f} MiB  {dtypes}")
    total = sum(s.parameters for s in summary.trees.values())
    size = sum(s.nbytes for s in summary.trees.values())
    rate = summary.bytes_read / 2**20 / max(summary.seconds, 1e-9)
    lines.append(f"{'total':<16} {total:>14,} {size / 2**20:>9.1f} MiB")
    lines.append(f"read {summary.tensors_read} tensors, {summary.bytes_read / 2**20:.1f} MiB in "
                 f"{summary.seconds:.1f} s ({rate:.1f} MiB/s)")
    return "\n".join(lines)

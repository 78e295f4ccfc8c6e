"""`load`: a Cosmos 3 model from a Hub-layout folder (safetensors, as published) or a converted folder.

Hub layout (spec §1.3): `model_index.json`, `transformer/` (diffusers flat keys, sharded safetensors + index),
`vae/`, `sound_tokenizer/`, `scheduler/scheduler_config.json`, `text_tokenizer/`, root reasoner `config.json`
(its ViT weights, root `model*.safetensors`, are not read here). A bare transformer component folder
(`config.json` of class Cosmos3OmniTransformer + weights) is accepted too. Both layouts give identical arrays.

Transformer tensors are read lazily through the key table: each stacked layer buffer is allocated once and
filled layer by layer; with `shardings`, every device reads only its own slice. The time embedder stays f32;
the other transformer weights are cast to `dtype` (kept as stored when `dtype` is None). The VAE and sound
tokenizer keep their stored dtypes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.config import Cosmos3Config, ConfigError
from cosmos_jax.convert import orbax_io
from cosmos_jax.convert.keymap_audio import audio_params_from_torch_state
from cosmos_jax.convert.keymap_transformer import DOMAIN, LINEAR, Entry, KeyMapError, check_state, key_table
from cosmos_jax.convert.keymap_vae import vae_params_from_torch_state
from cosmos_jax.convert.safetensors_io import CheckpointIndex, Transpose, make_sharded_array, read_stacked
from cosmos_jax.convert.tree_paths import get_path, set_path
from cosmos_jax.modeling.audio_tokenizer import AudioTokenizerConfig
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.modeling.wan_vae import WanVAEConfig
from cosmos_jax.sampling.scheduler import SchedulerConfig

COMPONENTS = ("transformer", "vae", "sound_tokenizer", "scheduler", "tokenizer")
TRANSFORMER_TREES = ("reasoner", "generator")
FLOAT_DTYPES = frozenset(np.dtype(d) for d in ("float16", jnp.bfloat16, "float32", "float64"))
TRANSFORMER_CLASS = "Cosmos3OmniTransformer"

LeafPath = tuple[str, ...]
Shardings = Any  # pytree of jax.sharding.Sharding matching params, or Callable[[LeafPath], Sharding]
Progress = Callable[[str, int], None]  # (torch key, bytes read)


@dataclasses.dataclass
class LoadedModel:
    """Everything `load` read. `params` = {"reasoner": ..., "generator": ...} (jax.Arrays)."""

    transformer_config: Cosmos3Config
    params: dict[str, Any]
    vae_config: WanVAEConfig | None
    vae_params: dict[str, Any] | None
    sound_config: AudioTokenizerConfig | None
    sound_params: dict[str, Any] | None
    scheduler_config: SchedulerConfig | None
    tokenizer_dir: Path | None
    model_index: dict[str, Any]
    reasoner_config: dict[str, Any] | None
    source: str  # "hub" or "converted"


# ------------------------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one model's parts live. `transformer_dir` holds config.json (and, for the Hub, the weights)."""

    root: Path
    transformer_dir: Path
    converted: bool

    def component(self, name: str) -> Path | None:
        """The folder of an optional component ('vae', 'sound_tokenizer', 'scheduler', 'text_tokenizer')."""
        folder = self.root / name
        return folder if folder.is_dir() and self.transformer_dir != self.root else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def locate(path: str | os.PathLike[str]) -> Layout:
    """Recognise a converted folder, a Hub pipeline folder or a bare transformer folder (ValueError otherwise)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such model folder")
    converted = orbax_io.is_converted(root)
    if converted:
        orbax_io.read_marker(root)
    if converted or (root / "model_index.json").is_file() or (root / "transformer").is_dir():
        if not (root / "transformer" / "config.json").is_file():
            raise ConfigError(f"{root}: model folder has no transformer/config.json")
        return Layout(root, root / "transformer", converted)
    config = root / "config.json"
    if config.is_file() and _read_json(config).get("_class_name") == TRANSFORMER_CLASS:
        return Layout(root, root, False)
    raise ConfigError(
        f"{root}: not a Cosmos 3 model folder (expected model_index.json + transformer/, a converted folder with "
        f"{orbax_io.MARKER}, or a transformer folder whose config.json has _class_name {TRANSFORMER_CLASS!r})"
    )


# ------------------------------------------------------------------------------------------- dtypes


def target_dtype(path: LeafPath, stored: np.dtype, dtype: Any) -> np.dtype:
    """The dtype a transformer leaf is loaded in: f32 for the time embedder, else `dtype` (None: as stored)."""
    if dtype is None:
        return np.dtype(stored)
    if "time_embedder" in path:
        return np.dtype(np.float32)
    return np.dtype(dtype)


def _dtype_problems(dtypes: Mapping[str, np.dtype], where: str) -> list[str]:
    return [
        f"wrong dtype for {key} in {where}: {np.dtype(dt)} (weights must be one of float16, bfloat16, float32, float64)"
        for key, dt in sorted(dtypes.items())
        if np.dtype(dt) not in FLOAT_DTYPES
    ]


# ------------------------------------------------------------------------------------------- transformer (Hub)


def abstract_transformer(config: Cosmos3Config) -> dict[str, Any]:
    """Leaf shapes of both trees (dtypes f32 except where the model fixes them), nothing allocated."""
    return Cosmos3Transformer(config, dtype=jnp.float32).abstract_params()


def validate_transformer_index(index: CheckpointIndex, config: Cosmos3Config, abstract: Any) -> None:
    """Raise KeyMapError naming the checkpoint folder and every missing, unexpected, wrong-shape and
    wrong-dtype key at once."""
    keys = index.keys()
    dtype_problems = _dtype_problems({k: index.dtype(k) for k in keys}, str(index.source))
    try:
        check_state({k: index.shape(k) for k in keys}, config, abstract)
    except KeyMapError as e:
        extra = "".join(f"\n  {p}" for p in dtype_problems)
        raise KeyMapError(
            f"{index.source} does not match the {config.num_hidden_layers}-layer config: {e}{extra}"
        ) from None
    if dtype_problems:
        raise KeyMapError(
            f"{index.source}: {len(dtype_problems)} problem(s) mapping the transformer checkpoint:\n  "
            + "\n  ".join(dtype_problems)
        )


def _layer_transform(index: CheckpointIndex, entry: Entry, layer_shape: tuple[int, ...], target: np.dtype,
                     key_of: Callable[[int], str], progress: Progress | None) -> Callable[[np.ndarray], np.ndarray]:
    """Per-layer torch -> Flax layout and cast for `read_stacked`; also reports progress and unmaps the files
    after each layer's (copied) read, so at most one layer's file pages are resident besides the stack."""
    count = itertools.count()

    def transform(array: np.ndarray) -> np.ndarray:
        index.close()
        i = next(count)
        if progress is not None:
            progress(key_of(i), array.nbytes)
        return entry.to_flax(array, layer_shape).astype(target, copy=False)

    return transform


def _read_entry(index: CheckpointIndex, entry: Entry, flax_shape: tuple[int, ...], dtype: Any,
                num_layers: int, progress: Progress | None) -> np.ndarray:
    """One leaf as numpy: stacked leaves filled layer by layer into one preallocated buffer."""
    keys = entry.torch_keys(num_layers)
    target = target_dtype(entry.path, index.dtype(keys[0]), dtype)
    if entry.per_layer:
        out = np.empty(flax_shape, target)
        transform = _layer_transform(index, entry, flax_shape[1:], target, keys.__getitem__, progress)
        return read_stacked(index, keys, out=out, transform=transform)
    array = index.read(entry.torch_key)
    if progress is not None:
        progress(entry.torch_key, array.nbytes)
    return np.ascontiguousarray(entry.to_flax(array, flax_shape).astype(target, copy=False))


def iter_transformer_leaves(
    index: CheckpointIndex,
    config: Cosmos3Config,
    dtype: Any = jnp.bfloat16,
    progress: Progress | None = None,
    trees: Sequence[str] = TRANSFORMER_TREES,
) -> Iterator[tuple[str, LeafPath, np.ndarray]]:
    """Validate, then yield (tree, path within the tree, numpy array) for every leaf of `trees`, one at a time."""
    abstract = abstract_transformer(config)
    validate_transformer_index(index, config, abstract)
    for entry in key_table(config):
        if entry.path[0] not in trees:
            continue
        shape = tuple(get_path(abstract, entry.path).shape)
        array = _read_entry(index, entry, shape, dtype, config.num_hidden_layers, progress)
        index.close()  # unmap the files: pages read so far would otherwise stay resident
        yield entry.path[0], entry.path[1:], array
        del array  # do not hold this leaf while the next one is read


def _sharded_entry(index: CheckpointIndex, entry: Entry, flax_shape: tuple[int, ...], dtype: Any,
                   num_layers: int, sharding: jax.sharding.Sharding) -> jax.Array:
    keys = entry.torch_keys(num_layers)
    target = target_dtype(entry.path, index.dtype(keys[0]), dtype)
    layer_shape = flax_shape[1:] if entry.per_layer else flax_shape
    if entry.transform == LINEAR:
        transform: Any = Transpose((1, 0))
    elif entry.transform == DOMAIN:
        transform = lambda a: a.reshape(layer_shape)  # noqa: E731
    else:
        transform = None
    array = make_sharded_array(index, keys if entry.per_layer else keys[0], sharding, transform)
    if array.dtype != target:
        array = jax.jit(lambda x: x.astype(target), out_shardings=sharding)(array)
    return array


# ------------------------------------------------------------------------------------------- shardings


def _sharding_for(shardings: Shardings, path: LeafPath) -> jax.sharding.Sharding | None:
    if shardings is None:
        return None
    if callable(shardings):
        return shardings(path)
    try:
        return get_path(shardings, path)
    except (KeyError, TypeError):
        raise ValueError(f"shardings has no entry for parameter {'/'.join(path)}") from None


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _load_hub_transformer(layout: Layout, config: Cosmos3Config, dtype: Any, shardings: Shardings) -> dict[str, Any]:
    params: dict[str, Any] = {}
    with CheckpointIndex.open(layout.transformer_dir) as index:
        if shardings is None:
            for tree, path, array in iter_transformer_leaves(index, config, dtype):
                set_path(params, (tree, *path), jax.device_put(array, _default_sharding()))
                del array
            return params
        abstract = abstract_transformer(config)
        validate_transformer_index(index, config, abstract)
        for entry in key_table(config):
            shape = tuple(get_path(abstract, entry.path).shape)
            sharding = _sharding_for(shardings, entry.path)
            value = _sharded_entry(index, entry, shape, dtype, config.num_hidden_layers, sharding)
            set_path(params, entry.path, value)
    return params


# ------------------------------------------------------------------------------------------- transformer (converted)


def _validate_converted_tree(folder: Path, want: Mapping[LeafPath, tuple[int, ...]]) -> dict[LeafPath, np.dtype]:
    have = orbax_io.tree_shapes(folder)
    problems = [f"missing {'/'.join(p)} (expected shape {s})" for p, s in sorted(want.items()) if p not in have]
    problems += [
        f"wrong shape for {'/'.join(p)}: got {have[p][0]}, expected {s}"
        for p, s in sorted(want.items())
        if p in have and have[p][0] != s
    ]
    problems += [f"unexpected {'/'.join(p)} (shape {have[p][0]})" for p in sorted(set(have) - set(want))]
    problems += _dtype_problems({"/".join(p): d for p, (_, d) in have.items()}, str(folder))
    if problems:
        raise orbax_io.ConvertedCheckpointError(
            f"{folder} does not match the config: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
    return {p: d for p, (_, d) in have.items()}


def _flat_shapes(tree: Any) -> dict[LeafPath, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(k.key) for k in keys): tuple(leaf.shape) for keys, leaf in flat}


def _load_converted_transformer(layout: Layout, config: Cosmos3Config, dtype: Any,
                                shardings: Shardings) -> dict[str, Any]:
    abstract = abstract_transformer(config)
    params: dict[str, Any] = {}
    for tree in TRANSFORMER_TREES:
        folder = layout.root / orbax_io.ORBAX_DIR / tree
        stored = _validate_converted_tree(folder, _flat_shapes(abstract[tree]))
        target: dict[str, Any] = {}
        for path, shape in _flat_shapes(abstract[tree]).items():
            sharding = _sharding_for(shardings, (tree, *path)) or _default_sharding()
            dt = target_dtype((tree, *path), stored[path], dtype)
            set_path(target, path, jax.ShapeDtypeStruct(shape, dt, sharding=sharding))
        params[tree] = orbax_io.restore_tree(folder, target)
    return params


# ------------------------------------------------------------------------------------------- other components


def read_state(folder: Path, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a (small) component checkpoint, in memory, dtypes checked to be floating."""
    with CheckpointIndex.open(folder) as index:
        dtype_problems = _dtype_problems({k: index.dtype(k) for k in index.keys()}, str(folder))
        if dtype_problems:
            raise KeyMapError("\n".join(dtype_problems))
        state = {}
        for key in index.keys():
            state[key] = index.read(key)
            if progress is not None:
                progress(key, state[key].nbytes)
        return state


def params_from_state(folder: Path, state: dict[str, np.ndarray], config: Any,
                      from_state: Callable[[dict[str, np.ndarray], Any], Any]) -> Any:
    """`from_state(state, config)` with its key/shape errors prefixed by the folder."""
    try:
        return from_state(state, config)
    except ValueError as e:
        raise KeyMapError(f"{folder}: {e}") from None


def _to_device(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), _default_sharding()), tree)


def _load_component(layout: Layout, name: str, tree: str, read_config: Callable[[Path], Any],
                    from_state: Callable[[dict[str, np.ndarray], Any], Any]) -> tuple[Any, Any]:
    folder = layout.component(name)
    if folder is None:
        return None, None
    config = read_config(folder / "config.json")
    if layout.converted:
        orbax_folder = layout.root / orbax_io.ORBAX_DIR / tree
        if not orbax_folder.is_dir():
            return config, None
        return config, _to_device(orbax_io.restore_tree(orbax_folder))
    return config, _to_device(params_from_state(folder, read_state(folder), config, from_state))


def read_vae_config(path: Path) -> WanVAEConfig:
    return WanVAEConfig.from_dict(_read_json(path))


def read_sound_config(path: Path) -> AudioTokenizerConfig:
    return AudioTokenizerConfig.from_dict(_read_json(path))


def load(
    path: str | os.PathLike[str],
    *,
    dtype: Any = jnp.bfloat16,
    shardings: Shardings = None,
    components: Sequence[str] = COMPONENTS,
) -> LoadedModel:
    """Load the requested components of a Hub-layout or converted folder.

    dtype: transformer weight dtype (time embedder always f32); None keeps the stored dtypes.
    shardings: for the transformer params, a pytree of `jax.sharding.Sharding` matching
    {"reasoner": ..., "generator": ...}, or a callable from a leaf path such as
    ("generator", "layers", "mlp", "up_proj", "kernel") to a Sharding; None puts every array on the first device.
    Errors name the file and every offending key.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {COMPONENTS}")
    layout = locate(path)
    config = Cosmos3Config.from_json(layout.transformer_dir / "config.json")
    params: dict[str, Any] = {}
    if "transformer" in components:
        reader = _load_converted_transformer if layout.converted else _load_hub_transformer
        params = reader(layout, config, dtype, shardings)
    vae_config = vae_params = sound_config = sound_params = None
    if "vae" in components:
        vae_config, vae_params = _load_component(layout, "vae", "vae", read_vae_config, vae_params_from_torch_state)
    if "sound_tokenizer" in components:
        sound_config, sound_params = _load_component(
            layout, "sound_tokenizer", "sound_tokenizer", read_sound_config, audio_params_from_torch_state
        )
    scheduler_dir = layout.component("scheduler")
    scheduler_config = None
    if "scheduler" in components and scheduler_dir is not None:
        scheduler_config = SchedulerConfig.from_json_file(scheduler_dir)
    tokenizer_dir = layout.component("text_tokenizer") if "tokenizer" in components else None
    index_path = layout.root / "model_index.json"
    model_index = _read_json(index_path) if index_path.is_file() else {}
    reasoner_path = layout.root / "config.json"
    reasoner_config = _read_json(reasoner_path) if layout.transformer_dir != layout.root and reasoner_path.is_file() \
        else None
    return LoadedModel(
        transformer_config=config, params=params, vae_config=vae_config, vae_params=vae_params,
        sound_config=sound_config, sound_params=sound_params, scheduler_config=scheduler_config,
        tokenizer_dir=tokenizer_dir, model_index=model_index, reasoner_config=reasoner_config,
        source="converted" if layout.converted else "hub",
    )

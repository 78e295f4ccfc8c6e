"""`load`: a Cosmos 3 model from a Hub-layout folder (safetensors, as published) or a converted folder.

Hub layout: `model_index.json`, `transformer/` (diffusers flat keys, sharded safetensors + index),
`vae/`, `sound_tokenizer/`, `scheduler/scheduler_config.json`, `text_tokenizer/`, and the reasoner at the root:
`config.json` (model_type cosmos3_omni) + `model*.safetensors` (+ index) holding the ViT (`blocks.*`, `merger.*`,
...) and usually the language tower, sometimes the generator tower too (a unified checkpoint). A bare transformer
component folder (`config.json` of class Cosmos3OmniTransformer + weights) is accepted too. Both layouts give
identical arrays.

The reasoner ("reasoner" component, not loaded by default) reuses the transformer's reasoner tower when the root
holds no language tower or one byte-identical to transformer/'s (docs/model.md, "The reasoner on its own"), so the LM
is held once; only a root LM that differs is read as its own copy.

Transformer tensors are read lazily through the key table (`keymap_transformer`): each stacked layer buffer is
allocated once and filled layer by layer; with `shardings`, every device reads only its own slice, through the
row's layout transform. The usual `shardings` is `cosmos_jax.sharding.param_shardings(abstract, mesh, rules)`,
which takes each leaf's logical axes from the same row, so key, layout and sharding of a weight are one row.
The time embedder stays f32; the other transformer weights are cast to `dtype` (kept as stored when `dtype` is
None). The VAE and sound tokenizer keep their stored dtypes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.config import ConfigError, Cosmos3Config, param_dtype
from cosmos_jax.convert import keymap_reasoner, modelopt_fp8, orbax_io
from cosmos_jax.convert.keymap_audio import audio_params_from_torch_state
from cosmos_jax.convert.keymap_transformer import Entry, KeyMapError, check_state, key_table
from cosmos_jax.convert.keymap_vae import vae_params_from_torch_state
from cosmos_jax.convert.quantize import (
    QTYPES,
    QUANTIZE_MODES,
    QVALUE,
    SCALE,
    check_mode,
    from_stored,
    is_quantized_path,
    place_quantized,
    quantize_leaf,
    quantize_params,
    scale_sharding,
)
from cosmos_jax.convert.safetensors_io import CheckpointIndex, make_sharded_array, read_stacked, shard_name
from cosmos_jax.convert.tree_paths import get_path, set_path
from cosmos_jax.modeling.audio_tokenizer import AudioTokenizerConfig
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.modeling.reasoner import Reasoner, ReasonerConfig
from cosmos_jax.modeling.wan_vae import WanVAEConfig
from cosmos_jax.scheduler_config import SchedulerConfig

COMPONENTS = ("transformer", "vae", "sound_tokenizer", "scheduler", "tokenizer", "reasoner")
DEFAULT_COMPONENTS = tuple(c for c in COMPONENTS if c != "reasoner")
ROOT_TREE = "root_reasoner"  # orbax tree of the tensors the root reasoner files add (the ViT, a differing LM)
ROOT_MARKER_KEY = "root_reasoner"  # marker entry recording RootContents and where the reasoner's LM comes from
QUANTIZE_MARKER_KEY = "quantize"  # marker entry: the mode the transformer's layer linears are stored in (if any)
LM_FROM_TRANSFORMER = "transformer"
LM_FROM_ROOT = "root"
TRANSFORMER_TREES = ("reasoner", "generator")
FLOAT_DTYPES = frozenset(np.dtype(d) for d in ("float16", jnp.bfloat16, "float32", "float64"))
TRANSFORMER_CLASS = "Cosmos3OmniTransformer"

LeafPath = tuple[str, ...]
Shardings = Any  # pytree of jax.sharding.Sharding matching params, or Callable[[LeafPath], Sharding]
Progress = Callable[[str, int], None]  # (torch key, bytes read)


@dataclasses.dataclass(frozen=True)
class RootContents:
    """What the root reasoner checkpoint holds besides the ViT and where, so `export` writes the same keys back.

    language_model: the language tower's tensors; generator: the generator tower's too (a unified checkpoint);
    linked: the root index names transformer/'s own shards for those (no copies on disk); vision_dir: the folder,
    relative to the root, of the ViT's files ("" = the root itself); aliases: Hub key -> stored key where they
    differ (Edge's `mlp.fc1/fc2`).
    """

    language_model: bool
    generator: bool
    linked: bool = False
    vision_dir: str = ""
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"language_model": self.language_model, "generator": self.generator, "linked": self.linked,
                "vision_dir": self.vision_dir, "aliases": dict(self.aliases)}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> RootContents:
        types = {"language_model": bool, "generator": bool, "linked": bool, "vision_dir": str, "aliases": Mapping}
        if not isinstance(raw, Mapping) or not all(isinstance(raw.get(k), t) for k, t in types.items()):
            raise orbax_io.ConvertedCheckpointError(f"{where}: malformed {ROOT_MARKER_KEY!r} entry {raw!r}")
        return cls(raw["language_model"], raw["generator"], raw["linked"], raw["vision_dir"], dict(raw["aliases"]))


@dataclasses.dataclass
class ReasonerWeights:
    """The reasoner of the root files, ready for `cosmos_jax.sampling.reason`.

    params: the `Reasoner` tree (embed_tokens, layers, norm, lm_head, and vision unless text-only).
    language_model_from: "transformer" when its LM leaves are the transformer's reasoner tower (the very arrays of
    LoadedModel.params["reasoner"] when that was loaded), "root" when the root holds a different LM of its own.
    """

    config: ReasonerConfig
    params: dict[str, Any]
    language_model_from: str
    contents: RootContents

    def model(self) -> Reasoner:
        """The `Reasoner` that runs `params` (computing in the dtype the weights are held in)."""
        return Reasoner(self.config, dtype=self.params["embed_tokens"]["embedding"].dtype)


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
    reasoner: ReasonerWeights | None = None
    fp8_revision: bool = False  # the transformer is ModelOpt's FP8 revision (cosmos_jax.convert.modelopt_fp8)
    fp8_policy: modelopt_fp8.StepPolicy | None = None  # its per-step W8A16/W8A8 schedule, if it declares one


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
    """Recognise a converted folder, a Hub pipeline folder or a bare transformer folder (ValueError otherwise).
    The layout's paths are absolute (orbax reads only absolute paths)."""
    root = Path(os.path.abspath(path))
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
    """The dtype a transformer leaf is loaded in: `param_dtype`'s policy for `dtype` (None: as stored)."""
    if dtype is None:
        return np.dtype(stored)
    return np.dtype(param_dtype(path, dtype))


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


class NonFiniteWeightWarning(UserWarning):
    """A checkpoint tensor holds NaN or Inf (it converts and loads, but the model's outputs will be garbage)."""


def warn_non_finite(array: np.ndarray, names: Sequence[str], where: str | os.PathLike) -> None:
    """Warn, naming the tensor, when a floating `array` holds NaN or Inf (one reduction per tensor). `names`: one
    name, or one per index of the leading axis (a stacked layer buffer) so the warning names the bad layer's key."""
    if array.dtype.kind != "f" and array.dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    if len(names) > 1 and array.shape[:1] == (len(names),):
        rows = finite.reshape(len(names), -1)
        bad = [names[i] for i in np.flatnonzero(~rows.all(axis=1))]
    else:
        bad = [names[0]]
    count = int(finite.size - np.count_nonzero(finite))
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    warnings.warn(f"{where}: tensor {shown} holds NaN/Inf ({count:,} of {finite.size:,} values)",
                  NonFiniteWeightWarning, stacklevel=2)


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
        warn_non_finite(array, entry.torch_keys(config.num_hidden_layers),
                        index.source)
        index.close()  # unmap the files: pages read so far would otherwise stay resident
        yield entry.path[0], entry.path[1:], array
        del array  # do not hold this leaf while the next one is read


def _sharded_entry(index: CheckpointIndex, entry: Entry, flax_shape: tuple[int, ...], dtype: Any,
                   num_layers: int, sharding: jax.sharding.Sharding) -> jax.Array:
    """One leaf placed in `sharding`, each device reading only its slice through the row's layout transform."""
    keys = entry.torch_keys(num_layers)
    target = target_dtype(entry.path, index.dtype(keys[0]), dtype)
    layout = entry.layout(flax_shape[1:] if entry.per_layer else flax_shape)
    array = make_sharded_array(index, keys if entry.per_layer else keys[0], sharding, layout)
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
    """This process's first device (under jax.distributed, jax.devices()[0] may belong to another process)."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _load_hub_transformer(layout: Layout, config: Cosmos3Config, dtype: Any, shardings: Shardings,
                          quantize: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    with CheckpointIndex.open(layout.transformer_dir) as index:
        if shardings is None:
            for tree, path, array in iter_transformer_leaves(index, config, dtype):
                value = quantize_leaf((tree, *path), jax.device_put(array, _default_sharding()), quantize)
                set_path(params, (tree, *path), value)
                del array, value
            return params
        abstract = abstract_transformer(config)
        validate_transformer_index(index, config, abstract)
        for entry in key_table(config):
            shape = tuple(get_path(abstract, entry.path).shape)
            sharding = _sharding_for(shardings, entry.path)
            value = _sharded_entry(index, entry, shape, dtype, config.num_hidden_layers, sharding)
            set_path(params, entry.path, place_quantized(quantize_leaf(entry.path, value, quantize), sharding))
    return params


# ------------------------------------------------------------------------------------------- transformer (converted)


def _validate_converted_tree(folder: Path, want: Mapping[LeafPath, tuple[int, ...]],
                             exact_dtypes: Mapping[LeafPath, np.dtype] | None = None) -> dict[LeafPath, np.dtype]:
    """Check the saved tree's leaves against `want` (path -> shape): floating dtypes, except the leaves of
    `exact_dtypes` (quantized values), which must have exactly theirs. Returns path -> stored dtype."""
    exact = exact_dtypes or {}
    have = orbax_io.tree_shapes(folder)
    problems = [f"missing {'/'.join(p)} (expected shape {s})" for p, s in sorted(want.items()) if p not in have]
    problems += [
        f"wrong shape for {'/'.join(p)}: got {have[p][0]}, expected {s}"
        for p, s in sorted(want.items())
        if p in have and have[p][0] != s
    ]
    problems += [f"unexpected {'/'.join(p)} (shape {have[p][0]})" for p in sorted(set(have) - set(want))]
    problems += [f"wrong dtype for {'/'.join(p)} in {folder}: {have[p][1]} (quantized values must be {np.dtype(d)})"
                 for p, d in sorted(exact.items()) if p in have and have[p][1] != np.dtype(d)]
    problems += _dtype_problems({"/".join(p): d for p, (_, d) in have.items() if p not in exact}, str(folder))
    if problems:
        raise orbax_io.ConvertedCheckpointError(
            f"{folder} does not match the config: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
    return {p: d for p, (_, d) in have.items()}


def _key_name(key: Any) -> str:
    """A pytree path entry's name: a dict key, or a dataclass field (a QArray's qvalue / scale)."""
    return str(getattr(key, "key", getattr(key, "name", key)))


def _flat_shapes(tree: Any) -> dict[LeafPath, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_name(k) for k in keys): tuple(leaf.shape) for keys, leaf in flat}


def _root(path: str | os.PathLike[str] | Layout) -> Path:
    return path.root if isinstance(path, Layout) else Path(os.path.abspath(path))


def stored_quantization(path: str | os.PathLike[str] | Layout) -> str | None:
    """The mode ("int8" / "fp8") a converted folder stores its transformer's layer linears in (`convert
    --quantize`); None for full-precision folders and any other folder."""
    root = _root(path)
    if not orbax_io.is_converted(root):
        return None
    mode = orbax_io.read_marker(root).get(QUANTIZE_MARKER_KEY)
    if mode is not None and mode not in QUANTIZE_MODES:
        raise orbax_io.ConvertedCheckpointError(f"{root / orbax_io.MARKER}: unknown {QUANTIZE_MARKER_KEY!r} entry "
                                                f"{mode!r} (expected one of {', '.join(QUANTIZE_MODES)})")
    return mode


def check_quantize(path: str | os.PathLike[str] | Layout, quantize: str | None, flag: str = "quantize=") -> None:
    """Refuse (ValueError naming `flag`) a `quantize` request that differs from the quantization a converted
    folder stores: a stored-quantized folder loads only with its own mode; any other folder with any mode."""
    stored = stored_quantization(path)
    if stored is None or quantize == stored:
        return
    again = "convert the model again without --quantize for full-precision weights"
    if quantize is None:
        raise ValueError(f"{_root(path)} stores its transformer quantized as {stored} (convert --quantize {stored}); "
                         f"load it with {flag}{stored}, or {again}")
    raise ValueError(f"{_root(path)} stores its transformer quantized as {stored}, not {quantize}: use "
                     f"{flag}{stored}, or {again} and quantize that as {quantize}")


def check_full_precision(path: str | os.PathLike[str] | Layout, what: str) -> None:
    """ValueError when the folder stores its transformer quantized: `what` needs full-precision weights."""
    mode = stored_quantization(path)
    if mode is not None:
        raise ValueError(f"{_root(path)} stores its transformer quantized as {mode} (for generation only); {what} "
                         "needs full-precision weights: convert the model again without --quantize")


def check_reasoner_weights(path: str | os.PathLike[str] | Layout) -> None:
    """ValueError when the reasoner would read its language model from a transformer stored quantized (a folder
    whose root reasoner files hold an LM of their own is fine: only the transformer's trees are quantized)."""
    root = _root(path)
    if stored_quantization(root) is None:
        return
    entry = orbax_io.read_marker(root).get(ROOT_MARKER_KEY)
    if not (isinstance(entry, Mapping) and entry.get("language_model_from") == LM_FROM_ROOT):
        check_full_precision(root, "the reasoner, whose language model is the transformer's reasoner tower,")


def _stored_targets(abstract: Any, tree: str, stored: Mapping[LeafPath, np.dtype], dtype: Any, shardings: Shardings,
                    mode: str | None) -> dict[str, Any]:
    """The restore target of one saved tree: ShapeDtypeStructs in their load dtype and sharding. Quantized values
    keep their stored dtype and take their kernel's sharding; scales take the kernel's dtype policy and
    `scale_sharding`."""
    target: dict[str, Any] = {}
    for path, shape in _flat_shapes(abstract).items():
        part = path[-1] if mode is not None and path[-1] in (QVALUE, SCALE) and is_quantized_path(
            (tree, *path[:-1])) else None
        weight = (tree, *path[:-1]) if part else (tree, *path)
        sharding = _sharding_for(shardings, weight) or _default_sharding()
        if part == QVALUE:
            dt = np.dtype(QTYPES[mode])
        else:
            dt = target_dtype(weight, stored[path], dtype)
        if part == SCALE:
            sharding = scale_sharding(sharding, shape)
        set_path(target, path, jax.ShapeDtypeStruct(shape, dt, sharding=sharding))
    return target


def _as_quantized(restored: dict[str, Any], tree: str, mode: str) -> dict[str, Any]:
    """The restored tree with every {qvalue, scale} pair of a quantized kernel made the QArray it was."""

    def rebuild(node: Any, path: LeafPath) -> Any:
        if not isinstance(node, dict):
            return node
        if set(node) == {QVALUE, SCALE} and is_quantized_path((tree, *path)):
            return from_stored(node[QVALUE], node[SCALE], mode)
        return {name: rebuild(child, (*path, name)) for name, child in node.items()}

    return rebuild(restored, ())


def _load_converted_transformer(layout: Layout, config: Cosmos3Config, dtype: Any, shardings: Shardings,
                                trees: Sequence[str] = TRANSFORMER_TREES, lazy: bool = False,
                                quantize: str | None = None) -> dict[str, Any]:
    """Both trees of a converted folder. A stored-quantized folder (which needs `quantize` = its mode) is read as
    it is stored: values and scales, never the full-precision kernels; otherwise kernels are quantized (and
    placed) one leaf at a time after the restore."""
    check_quantize(layout, quantize)
    stored_mode = stored_quantization(layout)
    abstract = abstract_transformer(config)
    if stored_mode is not None:
        abstract = jax.eval_shape(lambda p: quantize_params(p, stored_mode), abstract)
    params: dict[str, Any] = {}
    for tree in trees:
        folder = layout.root / orbax_io.ORBAX_DIR / tree
        want = _flat_shapes(abstract[tree])
        exact = {} if stored_mode is None else {
            p: np.dtype(QTYPES[stored_mode]) for p in want if p[-1] == QVALUE and is_quantized_path((tree, *p[:-1]))}
        stored = _validate_converted_tree(folder, want, exact)
        if lazy:
            params[tree] = orbax_io.lazy_tree(folder)
            continue
        target = _stored_targets(abstract[tree], tree, stored, dtype, shardings, stored_mode)
        restored = orbax_io.restore_tree(folder, target)
        if stored_mode is not None:
            params[tree] = _as_quantized(restored, tree, stored_mode)
        else:
            params[tree] = jax.tree_util.tree_map_with_path(
                lambda keys, x: place_quantized(quantize_leaf((tree, *map(_key_name, keys)), x, quantize),
                                                x.sharding), restored)
        del restored
    return params


# ------------------------------------------------------------------------------------------- reasoner (root files)


def has_root_reasoner(layout: Layout) -> bool:
    """True when the folder has reasoner weights at its root (root safetensors, or their converted tree)."""
    if layout.transformer_dir == layout.root:
        return False
    if layout.converted:
        return ROOT_MARKER_KEY in orbax_io.read_marker(layout.root)
    return any(layout.root.glob("*.safetensors")) or any(layout.root.glob("*.safetensors.index.json"))


def read_reasoner_config(root: Path) -> ReasonerConfig:
    """The root config.json as a ReasonerConfig (ConfigError naming the file)."""
    try:
        return ReasonerConfig.from_dict(_read_json(root / "config.json"))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{root / 'config.json'}: not a Cosmos 3 reasoner config ({e})") from None


def _same_tensor(a: CheckpointIndex, a_key: str, b: CheckpointIndex, b_key: str) -> bool:
    """Byte-identical tensors (the same key of the same file counts without reading it)."""
    if a_key == b_key and a.info(a_key).file.resolve() == b.info(b_key).file.resolve():
        return True
    if a.dtype(a_key) != b.dtype(b_key) or a.shape(a_key) != b.shape(b_key):
        return False
    same = np.array_equal(a.read(a_key).reshape(-1).view(np.uint8), b.read(b_key).reshape(-1).view(np.uint8))
    a.close()
    b.close()
    return same


def _generator_keys(config: Cosmos3Config) -> list[str]:
    return [k for e in key_table(config) if e.path[0] == "generator" for k in e.torch_keys(config.num_hidden_layers)]


def _vision_dir(root: CheckpointIndex, keys: Sequence[str]) -> str:
    """The folder (relative to the root, POSIX) holding the ViT's files when they share one, else ""."""
    folders = {root.info(k).file.parent.resolve() for k in keys}
    base = Path(root.source).resolve()
    if len(folders) != 1:
        return ""
    relative = folders.pop().relative_to(base).as_posix()
    return "" if relative == "." else relative


def resolve_root_reasoner(root: CheckpointIndex, config: ReasonerConfig, transformer: CheckpointIndex,
                       transformer_config: Cosmos3Config) -> tuple[RootContents, dict[str, str], str]:
    """Validate the root checkpoint and decide where the reasoner's LM comes from.

    Returns (contents, resolved Hub key -> stored key, "transformer" | "root"). The LM is taken from the transformer
    when the root holds none, or when every root LM tensor is transformer/'s own (a unified index naming its shards)
    or byte-identical to it (read and compared one tensor at a time). Root generator tensors must equal
    transformer/'s. KeyMapError lists every missing, unexpected, wrong-shape and wrong-dtype key at once.
    """
    shapes = {k: root.shape(k) for k in root.keys()}
    problems = [p for k in root.keys() for p in _dtype_problems({k: root.dtype(k)}, str(root.info(k).file))]
    has_lm = keymap_reasoner.stores_language_model(shapes, config)
    parts = keymap_reasoner.PARTS if has_lm else (keymap_reasoner.VISION,)
    abstract = Reasoner(config, dtype=jnp.float32).abstract_params()
    try:
        resolved = keymap_reasoner.resolve_keys(shapes, config, abstract, parts)
    except KeyMapError as e:  # its message: a count line, then one problem per line
        problems = [line.strip() for line in str(e).splitlines()[1:]] + problems
    if problems:
        files = ", ".join(shard_name(f, Path(root.source)) for f in root.files)
        raise KeyMapError(f"{root.source} ({files}): {len(problems)} problem(s) mapping the root reasoner checkpoint:"
                          "\n  " + "\n  ".join(problems))
    generator = [k for k in shapes if keymap_reasoner.is_generator_key(k)]
    if generator:
        want = _generator_keys(transformer_config)
        differ = sorted(set(want) ^ set(generator)) or [k for k in want if not _same_tensor(root, k, transformer, k)]
        if differ:
            raise KeyMapError(f"{root.source}: its generator tensors are not those of {transformer.source} "
                              f"(e.g. {differ[0]}); a root generator tower of its own is not supported")
    tables = {part: keymap_reasoner.tensor_table(config, (part,)) for part in keymap_reasoner.PARTS}
    lm_keys = [k for t in tables[keymap_reasoner.LANGUAGE_MODEL] for k in t.keys()] if has_lm else []
    vision_keys = [resolved[k] for t in tables[keymap_reasoner.VISION] for k in t.keys()]
    transformer_dir = Path(transformer.source).resolve()
    linked = bool(lm_keys) and all(root.info(k).file.resolve().is_relative_to(transformer_dir)
                                   for k in [resolved[k] for k in lm_keys] + generator)
    contents = RootContents(has_lm, bool(generator), linked, _vision_dir(root, vision_keys) if vision_keys else "",
                            {k: v for k, v in resolved.items() if k != v})
    same = all(k in transformer and _same_tensor(root, resolved[k], transformer, k) for k in lm_keys)
    return contents, resolved, LM_FROM_TRANSFORMER if same else LM_FROM_ROOT


def root_parts(language_model_from: str) -> tuple[str, ...]:
    """The reasoner parts held in the root tree: the ViT, plus the LM when it is the root's own."""
    if language_model_from == LM_FROM_ROOT:
        return keymap_reasoner.PARTS
    return (keymap_reasoner.VISION,)


def _check_shared_tower(config: ReasonerConfig, tower: Mapping[str, Any], where: str) -> None:
    """The transformer's reasoner tower must have the shapes the root config.json's text_config describes."""
    abstract = Reasoner(config, dtype=jnp.float32).abstract_params()
    want = _flat_shapes({k: v for k, v in abstract.items() if k != "vision"})
    have = _flat_shapes(tower)
    if want != have:
        bad = sorted(p for p in set(want) | set(have) if want.get(p) != have.get(p))
        raise ConfigError(f"{where}: the root config.json's text_config does not describe the transformer's reasoner "
                          f"tower ({'/'.join(bad[0])}: {want.get(bad[0])} vs {have.get(bad[0])})")


def _transformer_tower(layout: Layout, config: Cosmos3Config, dtype: Any, loaded: dict[str, Any] | None,
                       lazy: bool) -> dict[str, Any]:
    """params["reasoner"]: the loaded arrays themselves, else read from the transformer checkpoint."""
    if loaded is None:
        check_reasoner_weights(layout)
    if loaded is not None:
        return dict(loaded)
    if layout.converted:
        return _load_converted_transformer(layout, config, dtype, None, ("reasoner",), lazy)["reasoner"]
    tower: dict[str, Any] = {}
    with CheckpointIndex.open(layout.transformer_dir) as index:
        for _, path, array in iter_transformer_leaves(index, config, dtype, trees=("reasoner",)):
            set_path(tower, path, jax.device_put(array, _default_sharding()))
            del array
    return tower


def reasoner_tower(path: str | os.PathLike[str], dtype: Any = None) -> tuple[ReasonerConfig, dict[str, Any]]:
    """The text-only reasoner held in the transformer's reasoner tower (for folders without root reasoner files):
    its config (the transformer's, no vision encoder) and params (embed, layers, norm, lm_head)."""
    layout = locate(path)
    config = Cosmos3Config.from_json(layout.transformer_dir / "config.json")
    tower = _transformer_tower(layout, config, dtype, None, False)
    return ReasonerConfig(text=config, vision=None, model_type="cosmos3_transformer_tower"), tower


def _with_tower(weights: ReasonerWeights, layout: Layout, config: Cosmos3Config, dtype: Any,
                loaded: dict[str, Any] | None, lazy: bool = False) -> ReasonerWeights:
    if weights.language_model_from == LM_FROM_TRANSFORMER:
        tower = _transformer_tower(layout, config, dtype, loaded, lazy)
        _check_shared_tower(weights.config, tower, str(layout.root))
        weights.params.update(tower)
    return weights


def _load_hub_reasoner(layout: Layout, config: Cosmos3Config, dtype: Any,
                       loaded: dict[str, Any] | None) -> ReasonerWeights:
    reasoner_config = read_reasoner_config(layout.root)
    with CheckpointIndex.open(layout.root) as root, CheckpointIndex.open(layout.transformer_dir) as transformer:
        contents, resolved, lm_from = resolve_root_reasoner(root, reasoner_config, transformer, config)
        params: dict[str, Any] = {}
        for path, array in keymap_reasoner.iter_params(root, reasoner_config, resolved, dtype, root_parts(lm_from)):
            set_path(params, path, jax.device_put(array, _default_sharding()))
            del array
    weights = ReasonerWeights(reasoner_config, params, lm_from, contents)
    return _with_tower(weights, layout, config, dtype, loaded)


def _load_converted_reasoner(layout: Layout, config: Cosmos3Config, dtype: Any, loaded: dict[str, Any] | None,
                             lazy: bool) -> ReasonerWeights:
    reasoner_config = read_reasoner_config(layout.root)
    where = str(layout.root / orbax_io.MARKER)
    entry = orbax_io.read_marker(layout.root)[ROOT_MARKER_KEY]
    lm_from = entry.get("language_model_from") if isinstance(entry, Mapping) else None
    if lm_from not in (LM_FROM_TRANSFORMER, LM_FROM_ROOT):
        raise orbax_io.ConvertedCheckpointError(f"{where}: malformed {ROOT_MARKER_KEY!r} entry {entry!r}")
    contents = RootContents.from_dict(entry.get("contents"), where)
    abstract = Reasoner(reasoner_config, dtype=jnp.float32).abstract_params()
    own_lm = keymap_reasoner.LANGUAGE_MODEL in root_parts(lm_from)
    want = {k: v for k, v in abstract.items() if k == "vision" or own_lm}
    params: dict[str, Any] = {}
    if want:
        folder = layout.root / orbax_io.ORBAX_DIR / ROOT_TREE
        stored = _validate_converted_tree(folder, _flat_shapes(want))
        if lazy:
            params = orbax_io.lazy_tree(folder)
        else:
            target: dict[str, Any] = {}
            for path, shape in _flat_shapes(want).items():
                dt = np.dtype(stored[path] if dtype is None else dtype)
                set_path(target, path, jax.ShapeDtypeStruct(shape, dt, sharding=_default_sharding()))
            params = orbax_io.restore_tree(folder, target)
    weights = ReasonerWeights(reasoner_config, params, lm_from, contents)
    return _with_tower(weights, layout, config, dtype, loaded, lazy)


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
            warn_non_finite(state[key], [key], folder)
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
    components: Sequence[str] = DEFAULT_COMPONENTS,
    lazy: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Load the requested components of a Hub-layout or converted folder.

    components: some of COMPONENTS; the default leaves out "reasoner" (the root ViT, which generation never uses).
    dtype: transformer and reasoner weight dtype (time embedder always f32); None keeps the stored dtypes.
    shardings: for the transformer params, a pytree of `jax.sharding.Sharding` matching
    {"reasoner": ..., "generator": ...}, or a callable from a leaf path such as
    ("generator", "layers", "mlp", "up_proj", "kernel") to a Sharding, usually
    `cosmos_jax.sharding.param_shardings(abstract, mesh, rules)`; None puts every array on the first device.
    lazy: converted folders only, with dtype and shardings None: the transformer and reasoner leaves are
    `orbax_io.LazyLeaf`s read on access, one leaf held at a time per tree (for streaming exports).
    quantize: None, "int8" or "fp8": the transformer's layer linears are quantized (`cosmos_jax.convert.quantize`)
    leaf by leaf as they are read (Hub layout; a converted folder tree by tree), so the full-precision tree is
    never held whole. A converted folder stored quantized (`convert --quantize`) needs `quantize` = its mode and
    is read as stored, values and scales only (`dtype` then sets the scales' dtype); it holds no full-precision
    transformer for `lazy` or for a reasoner whose language model is the transformer's tower.
    Errors name the file and every offending key.
    """
    check_mode(quantize, "quantize")
    if lazy and quantize is not None:
        raise ValueError("lazy=True reads the stored weights as they are; it cannot be combined with quantize")
    if quantize is not None and "reasoner" in components:
        raise ValueError("quantize applies to generation; load the 'reasoner' component without it")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {COMPONENTS}")
    layout = locate(path)
    if lazy and (not layout.converted or dtype is not None or shardings is not None):
        raise ValueError("lazy=True needs a converted folder, dtype=None and shardings=None")
    if lazy:
        check_full_precision(layout, "lazy loading (export)")
    if "transformer" in components:
        check_quantize(layout, quantize)
    config = Cosmos3Config.from_json(layout.transformer_dir / "config.json")
    params: dict[str, Any] = {}
    fp8_revision = not layout.converted and modelopt_fp8.quantization_config(config) is not None
    fp8_policy = modelopt_fp8.read_policy(config) if fp8_revision else None
    if fp8_revision and "reasoner" in components:
        raise ValueError(f"{layout.transformer_dir}: the FP8 revision quantizes the reasoner tower; reasoning needs "
                         "a full-precision revision")
    if fp8_revision and (quantize is not None or shardings is not None or lazy):
        raise ValueError(f"{layout.transformer_dir}: the FP8 revision is already quantized; load it without "
                         "quantize, shardings or lazy")
    if "transformer" in components:
        if fp8_revision:
            params = modelopt_fp8.load_transformer(layout.transformer_dir, config, dtype)
        elif layout.converted:
            params = _load_converted_transformer(layout, config, dtype, shardings, lazy=lazy, quantize=quantize)
        else:
            params = _load_hub_transformer(layout, config, dtype, shardings, quantize)
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
    reasoner = None
    if "reasoner" in components:
        reasoner = _root_reasoner(layout, config, dtype, params.get("reasoner"), lazy)
    return LoadedModel(
        transformer_config=config, params=params, vae_config=vae_config, vae_params=vae_params,
        sound_config=sound_config, sound_params=sound_params, scheduler_config=scheduler_config,
        tokenizer_dir=tokenizer_dir, model_index=model_index, reasoner_config=reasoner_config,
        source="converted" if layout.converted else "hub", reasoner=reasoner, fp8_revision=fp8_revision,
        fp8_policy=fp8_policy,
    )


def _root_reasoner(layout: Layout, config: Cosmos3Config, dtype: Any, tower: dict[str, Any] | None,
                   lazy: bool) -> ReasonerWeights | None:
    if not has_root_reasoner(layout):
        return None
    if layout.converted:
        return _load_converted_reasoner(layout, config, dtype, tower, lazy)
    return _load_hub_reasoner(layout, config, dtype, tower)


def load_root_reasoner(path: str | os.PathLike[str], *, dtype: Any = jnp.bfloat16,
                       tower: dict[str, Any] | None = None) -> ReasonerWeights | None:
    """The root reasoner of a pipeline folder (Hub or converted; None without root reasoner files), as
    `load(components=("reasoner",))` reads it. tower: the transformer's reasoner tower already in memory
    (params["reasoner"] of a loaded pipeline, in `dtype`): when the reasoner's LM is the transformer's, these very
    arrays are used instead of a second copy read from disk."""
    layout = locate(path)
    config = Cosmos3Config.from_json(layout.transformer_dir / "config.json")
    return _root_reasoner(layout, config, dtype, tower, False)


def load_reasoner(model_dir: str | os.PathLike, dtype: Any = jnp.bfloat16) -> tuple[Reasoner, dict[str, Any]]:
    """The reasoner of a Hub-layout folder (root config.json + root safetensors), weights cast to `dtype`."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"model folder not found: {root}")
    config = ReasonerConfig.from_json(root / "config.json")
    model = Reasoner(config, dtype=dtype)
    abstract = model.abstract_params()
    with CheckpointIndex.open(root) as index:
        resolved = keymap_reasoner.resolve_keys({k: index.shape(k) for k in index.keys()}, config, abstract)
        params: dict[str, Any] = {}
        for path, value in keymap_reasoner.iter_params(index, config, resolved, dtype):
            set_path(params, path, jnp.asarray(value))
    return model, params

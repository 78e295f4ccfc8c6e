"""The reasoner checkpoint at the root of a Cosmos 3 repository <-> params["reasoner"], as a table of data.

transformers 5.23 saves `Cosmos3OmniForConditionalGeneration` under the Hub's flat names: the language tower as
`embed_tokens`, `layers.{i}.self_attn.{to_q,to_k,to_v,to_out,norm_q,norm_k}`, `layers.{i}.mlp.*`, `norm`,
`lm_head` (exactly the reasoner entries of the transformer key map) and the ViT as `patch_embed`, `pos_embed`,
`blocks.{i}`, `merger`, `deepstack_merger_list.{i}`. The unified Hub checkpoint also holds the generator tower;
those keys are skipped (the same patterns transformers drops). Edge (`cosmos3_edge`): the text tower only; its
MLP may be stored as `mlp.up_proj/down_proj` (Hub) or `mlp.fc1/fc2` (transformers' module names).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from cosmos_jax.convert.keymap_transformer import LINEAR, KeyMapError, key_table
from cosmos_jax.convert.safetensors_io import CheckpointIndex, read_stacked
from cosmos_jax.convert.tree_paths import get_path, set_path
from cosmos_jax.modeling.reasoner import Reasoner, ReasonerConfig

IDENTITY = "identity"
PATCH = "patch"  # Conv3d (out, C, t, h, w) <-> Dense kernel (C*t*h*w, out)

GENERATOR_KEYS = re.compile(
    r"\.add_q_proj\.|\.add_k_proj\.|\.add_v_proj\.|\.to_add_out\.|\.norm_added_q\.|\.norm_added_k\.|moe_gen|"
    r"k_norm_und_for_gen|^proj_out\.|^proj_in\.|^time_embedder\.|^audio_proj_out\.|^audio_proj_in\.|"
    r"^audio_modality_embed$|^action_proj_out\.|^action_proj_in\.|^action_modality_embed$"
)
EDGE_MLP_ALIASES = {".mlp.up_proj.": ".mlp.fc1.", ".mlp.down_proj.": ".mlp.fc2."}
LANGUAGE_MODEL = "language_model"  # embed_tokens, layers, norm, lm_head
VISION = "vision"  # patch_embed, pos_embed, blocks, merger, deepstack_merger_list
PARTS = (LANGUAGE_MODEL, VISION)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: key (with '{i}' when stacked over `count` items), path in params["reasoner"]."""

    key: str
    path: tuple[str, ...]
    transform: str = IDENTITY
    count: int | None = None

    def keys(self) -> list[str]:
        return [self.key] if self.count is None else [self.key.format(i=i) for i in range(self.count)]

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        if self.transform == LINEAR:
            return np.ascontiguousarray(array.T)
        if self.transform == PATCH:
            return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)
        return array

    def to_torch(self, array: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
        if self.transform in (LINEAR, PATCH):
            return np.ascontiguousarray(array.T).reshape(torch_shape)
        return array

    def torch_shape(self, flax_shape: tuple[int, ...], config: ReasonerConfig) -> tuple[int, ...]:
        if self.transform == LINEAR:
            return tuple(reversed(flax_shape))
        if self.transform == PATCH:
            v = config.vision
            return (flax_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        return tuple(flax_shape)


def _linear(prefix: str, path: tuple[str, ...], count: int | None) -> list[Tensor]:
    return [Tensor(f"{prefix}.weight", path + ("kernel",), LINEAR, count), Tensor(f"{prefix}.bias", path + ("bias",),
                                                                                   count=count)]


def _layer_norm(prefix: str, path: tuple[str, ...], count: int | None) -> list[Tensor]:
    return [Tensor(f"{prefix}.weight", path + ("scale",), count=count), Tensor(f"{prefix}.bias", path + ("bias",),
                                                                               count=count)]


def _merger(prefix: str, path: tuple[str, ...], count: int | None) -> list[Tensor]:
    return (_layer_norm(f"{prefix}.norm", path + ("norm",), count)
            + _linear(f"{prefix}.linear_fc1", path + ("linear_fc1",), count)
            + _linear(f"{prefix}.linear_fc2", path + ("linear_fc2",), count))


VISION_KEYS = re.compile(r"^(blocks\.|merger\.|patch_embed\.|pos_embed\.|deepstack_merger_list\.)")


def is_vision_key(key: str) -> bool:
    """True for a ViT tensor of the root checkpoint (`blocks.*`, `merger.*`, ...)."""
    return VISION_KEYS.search(key) is not None


def is_generator_key(key: str) -> bool:
    """True for a generator-tower tensor of a unified checkpoint (skipped by the reasoner)."""
    return GENERATOR_KEYS.search(key) is not None


def _check_parts(parts: Sequence[str]) -> None:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown reasoner part(s) {unknown}; choose from {PARTS}")


def tensor_table(config: ReasonerConfig, parts: Sequence[str] = PARTS) -> list[Tensor]:
    """Every tensor of the reasoner checkpoint for this config, restricted to `parts` (LANGUAGE_MODEL, VISION)."""
    _check_parts(parts)
    table = []
    for entry in key_table(config.text) if LANGUAGE_MODEL in parts else []:
        if entry.path[0] != "reasoner":
            continue
        count = config.text.num_hidden_layers if entry.per_layer else None
        table.append(Tensor(entry.torch_key, entry.path[1:], entry.transform, count))
    if config.vision is not None and VISION in parts:
        depth, deep = config.vision.depth, len(config.vision.deepstack_visual_indexes)
        blocks = ("vision", "blocks")
        table += [
            Tensor("patch_embed.proj.weight", ("vision", "patch_embed", "kernel"), PATCH),
            Tensor("patch_embed.proj.bias", ("vision", "patch_embed", "bias")),
            Tensor("pos_embed.weight", ("vision", "pos_embed", "embedding")),
            *_layer_norm("blocks.{i}.norm1", blocks + ("norm1",), depth),
            *_layer_norm("blocks.{i}.norm2", blocks + ("norm2",), depth),
            *_linear("blocks.{i}.attn.qkv", blocks + ("qkv",), depth),
            *_linear("blocks.{i}.attn.proj", blocks + ("proj",), depth),
            *_linear("blocks.{i}.mlp.linear_fc1", blocks + ("linear_fc1",), depth),
            *_linear("blocks.{i}.mlp.linear_fc2", blocks + ("linear_fc2",), depth),
            *_merger("merger", ("vision", "merger"), None),
        ]
        if deep:
            table += _merger("deepstack_merger_list.{i}", ("vision", "deepstack_merger_list"), deep)
    return table


def _stored_name(key: str, available: Mapping[str, Any], edge: bool) -> str:
    """The name `key` is stored under: itself, or (Edge) its transformers MLP alias if only that exists."""
    if key in available or not edge:
        return key
    for hub, alias in EDGE_MLP_ALIASES.items():
        if hub in key and key.replace(hub, alias) in available:
            return key.replace(hub, alias)
    return key


def stores_language_model(keys: Sequence[str] | Mapping[str, Any], config: ReasonerConfig) -> bool:
    """True when a checkpoint with these keys holds (some of) the language tower, under Hub or Edge alias names."""
    available = keys if isinstance(keys, Mapping) else dict.fromkeys(keys)
    edge = config.model_type == "cosmos3_edge"
    return any(_stored_name(key, available, edge) in available
               for tensor in tensor_table(config, (LANGUAGE_MODEL,)) for key in tensor.keys())


def resolve_keys(shapes: Mapping[str, tuple[int, ...]], config: ReasonerConfig, abstract: Any,
                 parts: Sequence[str] = PARTS) -> dict[str, str]:
    """Map each expected key of `parts` to the stored key; KeyMapError listing every missing, unexpected and
    wrong-shape key (generator tensors of a unified checkpoint are skipped)."""
    problems, resolved = [], {}
    edge = config.model_type == "cosmos3_edge"
    for tensor in tensor_table(config, parts):
        flax_shape = tuple(get_path(abstract, tensor.path).shape)
        want = tensor.torch_shape(flax_shape if tensor.count is None else flax_shape[1:], config)
        for key in tensor.keys():
            stored = _stored_name(key, shapes, edge)
            resolved[key] = stored
            if stored not in shapes:
                problems.append(f"missing key {key} (expected shape {want})")
            elif tuple(shapes[stored]) != want:
                problems.append(f"wrong shape for {stored}: got {tuple(shapes[stored])}, expected {want}")
    for key in sorted(set(shapes) - set(resolved.values())):
        skipped = is_generator_key(key) or (config.vision is None and edge and not key.startswith(
            ("layers.", "embed_tokens.", "norm.", "lm_head.")))
        if not skipped:
            kind = "vision " if is_vision_key(key) else ""
            problems.append(f"unexpected {kind}key {key} (shape {tuple(shapes[key])})")
    if problems:
        raise KeyMapError(f"{len(problems)} problem(s) mapping the reasoner checkpoint:\n  " + "\n  ".join(problems))
    return resolved


def params_from_state(state: Mapping[str, np.ndarray], model: Reasoner) -> dict[str, Any]:
    """params["reasoner"] (numpy, stored dtypes) from an in-memory state dict with the Hub's flat names."""
    abstract = model.abstract_params()
    resolved = resolve_keys({k: v.shape for k, v in state.items()}, model.config, abstract)
    params: dict[str, Any] = {}
    for tensor in tensor_table(model.config):
        arrays = [tensor.to_flax(np.asarray(state[resolved[k]])) for k in tensor.keys()]
        set_path(params, tensor.path, arrays[0] if tensor.count is None else np.stack(arrays))
    return params


def iter_state(params: Mapping[str, Any], config: ReasonerConfig,
               parts: Sequence[str] = PARTS) -> Iterator[tuple[str, np.ndarray]]:
    """The Hub-named tensors (numpy, dtypes as held) of `parts` of params["reasoner"], one at a time."""
    for tensor in tensor_table(config, parts):
        value = get_path(params, tensor.path)
        per_item = tuple(value.shape) if tensor.count is None else tuple(value.shape[1:])
        torch_shape = tensor.torch_shape(per_item, config)
        if tensor.count is None:
            yield tensor.key, tensor.to_torch(np.asarray(value), torch_shape)
        else:
            for i, key in enumerate(tensor.keys()):
                yield key, tensor.to_torch(np.asarray(value[i]), torch_shape)


def state_from_params(params: Mapping[str, Any], config: ReasonerConfig) -> dict[str, np.ndarray]:
    """The flat Hub-named state dict (numpy) of params["reasoner"]: the inverse of `params_from_state`."""
    return dict(iter_state(params, config))


def iter_params(index: CheckpointIndex, config: ReasonerConfig, resolved: Mapping[str, str], dtype: Any,
                parts: Sequence[str] = PARTS) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(path in params["reasoner"], numpy array) for every leaf of `parts`, read lazily from `index` through the
    `resolve_keys` map; stacked leaves are filled item by item into one buffer. dtype None keeps the stored one."""
    for tensor in tensor_table(config, parts):
        stored = [resolved[k] for k in tensor.keys()]
        target = np.dtype(index.dtype(stored[0]) if dtype is None else dtype)

        def transform(array: np.ndarray, tensor: Tensor = tensor, target: np.dtype = target) -> np.ndarray:
            return tensor.to_flax(array).astype(target, copy=False)

        if tensor.count is None:
            value = np.ascontiguousarray(transform(index.read(stored[0])))
        else:
            value = read_stacked(index, stored, transform=transform)
        index.close()  # unmap the files: pages read so far would otherwise stay resident
        yield tensor.path, value
        del value

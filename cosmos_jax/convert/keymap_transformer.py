"""The diffusers `Cosmos3OmniTransformer` state dict <-> the two Flax trees, as a table of data.

Each `Entry` names one torch key (per layer, with `{i}`, or top level), where it lives in the Flax trees and the
transform between the layouts. torch Linear weights are (out, in); Flax kernels are (in, out). The per-domain
action weights are stored as embeddings [domains, in*out] whose row reshapes to (in, out) (docs/model.md, "Conditioning per mode").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.tree_paths import get_path, set_path

LINEAR = "linear"  # (out, in) <-> (in, out)
IDENTITY = "identity"
DOMAIN = "domain"  # (domains, in*out) <-> (domains, in, out)


class KeyMapError(ValueError):
    """State-dict keys or shapes do not match the model: lists every problem at once."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: torch key (with '{i}' for layer entries), Flax path (tower, ...), transform."""

    torch_key: str
    path: tuple[str, ...]
    transform: str = IDENTITY
    per_layer: bool = False

    def torch_keys(self, num_layers: int) -> list[str]:
        if self.per_layer:
            return [self.torch_key.format(i=i) for i in range(num_layers)]
        return [self.torch_key]

    def to_flax(self, array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
        """One torch tensor -> its Flax layout (`flax_shape` is the per-layer shape for layer entries)."""
        if self.transform == LINEAR:
            return np.ascontiguousarray(array.T)
        if self.transform == DOMAIN:
            return array.reshape(flax_shape)
        return array

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.transform == LINEAR:
            return np.ascontiguousarray(array.T)
        if self.transform == DOMAIN:
            return array.reshape(array.shape[0], -1)
        return array

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.transform == LINEAR:
            return tuple(reversed(flax_shape))
        if self.transform == DOMAIN:
            return (flax_shape[0], int(np.prod(flax_shape[1:])))
        return tuple(flax_shape)


def _layer_entries(config: Cosmos3Config) -> Iterator[Entry]:
    silu = config.hidden_act == "silu"
    towers = (
        ("reasoner", "", ("to_q", "to_k", "to_v", "to_out"), ("norm_q", "norm_k") if config.qk_norm_for_text else None),
        ("generator", "_moe_gen", ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"), ("norm_added_q", "norm_added_k")),
    )
    for tower, suffix, projections, qk_norms in towers:
        prefix = "layers.{i}."
        for torch_name, flax_name in zip(projections, ("q_proj", "k_proj", "v_proj", "o_proj")):
            yield Entry(f"{prefix}self_attn.{torch_name}.weight", (tower, "layers", flax_name, "kernel"), LINEAR, True)
        if qk_norms:
            for torch_name, flax_name in zip(qk_norms, ("q_norm", "k_norm")):
                yield Entry(f"{prefix}self_attn.{torch_name}.weight", (tower, "layers", flax_name, "scale"), per_layer=True)
        mlp = "mlp" + suffix
        for proj in (("gate_proj",) if silu else ()) + ("up_proj", "down_proj"):
            yield Entry(f"{prefix}{mlp}.{proj}.weight", (tower, "layers", "mlp", proj, "kernel"), LINEAR, True)
        yield Entry(f"{prefix}input_layernorm{suffix}.weight", (tower, "layers", "input_norm", "scale"), per_layer=True)
        yield Entry(
            f"{prefix}post_attention_layernorm{suffix}.weight",
            (tower, "layers", "post_attention_norm", "scale"),
            per_layer=True,
        )
    if config.has_und_k_norm_for_gen:
        yield Entry("layers.{i}.self_attn.k_norm_und_for_gen.weight", ("generator", "layers", "und_k_norm", "scale"),
                    per_layer=True)


def _top_entries(config: Cosmos3Config) -> Iterator[Entry]:
    yield Entry("embed_tokens.weight", ("reasoner", "embed_tokens", "embedding"))
    yield Entry("norm.weight", ("reasoner", "norm", "scale"))
    yield Entry("lm_head.weight", ("reasoner", "lm_head", "kernel"), LINEAR)
    yield Entry("norm_moe_gen.weight", ("generator", "norm", "scale"))
    linears = ["proj_in", "proj_out", "time_embedder.linear_1", "time_embedder.linear_2"]
    if config.sound_gen:
        linears += ["audio_proj_in", "audio_proj_out"]
        yield Entry("audio_modality_embed", ("generator", "audio_modality_embed"))
    for name in linears:
        path = ("generator",) + tuple(name.split("."))
        yield Entry(f"{name}.weight", path + ("kernel",), LINEAR)
        yield Entry(f"{name}.bias", path + ("bias",))
    if config.action_gen:
        for name in ("action_proj_in", "action_proj_out"):
            yield Entry(f"{name}.fc.weight", ("generator", name, "kernel"), DOMAIN)
            yield Entry(f"{name}.bias.weight", ("generator", name, "bias"))
        yield Entry("action_modality_embed", ("generator", "action_modality_embed"))


def key_table(config: Cosmos3Config) -> list[Entry]:
    """Every tensor of the diffusers transformer checkpoint for this config."""
    return list(_top_entries(config)) + list(_layer_entries(config))


def check_state(state_shapes: Mapping[str, tuple[int, ...]], config: Cosmos3Config, abstract_params: Any) -> None:
    """Raise KeyMapError listing every missing, unexpected and wrong-shape key at once."""
    problems: list[str] = []
    expected: set[str] = set()
    for entry in key_table(config):
        flax_shape = tuple(get_path(abstract_params, entry.path).shape)
        per_tensor = flax_shape[1:] if entry.per_layer else flax_shape
        want = entry.torch_shape(per_tensor)
        for key in entry.torch_keys(config.num_hidden_layers):
            expected.add(key)
            if key not in state_shapes:
                problems.append(f"missing key {key} (expected shape {want})")
            elif tuple(state_shapes[key]) != want:
                problems.append(f"wrong shape for {key}: got {tuple(state_shapes[key])}, expected {want}")
    for key in sorted(set(state_shapes) - expected):
        problems.append(f"unexpected key {key} (shape {tuple(state_shapes[key])})")
    if problems:
        raise KeyMapError(f"{len(problems)} problem(s) mapping the transformer checkpoint:\n  " + "\n  ".join(problems))


def params_from_torch_state(
    state: Mapping[str, np.ndarray], config: Cosmos3Config, abstract_params: Any
) -> dict[str, Any]:
    """Build both trees (numpy arrays, dtypes as stored) from a full in-memory state dict."""
    check_state({k: v.shape for k, v in state.items()}, config, abstract_params)
    params: dict[str, Any] = {}
    for entry in key_table(config):
        flax_shape = tuple(get_path(abstract_params, entry.path).shape)
        if entry.per_layer:
            layers = [entry.to_flax(state[k], flax_shape[1:]) for k in entry.torch_keys(config.num_hidden_layers)]
            value = np.stack(layers)
        else:
            value = entry.to_flax(state[entry.torch_key], flax_shape)
        set_path(params, entry.path, value)
    return params


def torch_state_from_params(params: Mapping[str, Any], config: Cosmos3Config) -> dict[str, np.ndarray]:
    """The diffusers state dict (numpy, dtypes as held) for both trees: the inverse of `params_from_torch_state`."""
    state: dict[str, np.ndarray] = {}
    for entry in key_table(config):
        value = np.asarray(get_path(params, entry.path))
        if entry.per_layer:
            for i, key in enumerate(entry.torch_keys(config.num_hidden_layers)):
                state[key] = entry.to_torch(value[i])
        else:
            state[entry.torch_key] = entry.to_torch(value)
    return state

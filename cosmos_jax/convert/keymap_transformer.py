"""The diffusers `Cosmos3OmniTransformer` state dict <-> the two Flax trees, and how each tensor is sharded.

This is the one table a transformer weight goes through. Each `Entry` row names one torch key (per layer, with
`{i}`, or top level), where it lives in the Flax trees, the transform between the layouts and the *logical axes* of
its Flax array ("embed", "q_heads", "mlp", ...). Following one weight from key to device:

    Entry("layers.{i}.self_attn.add_q_proj.weight", ("generator", "layers", "q_proj", "kernel"), LINEAR,
          axes=("embed", "q_heads"), per_layer=True)

1. the torch tensors `layers.0...`, `layers.1...` (each (out, in)) are read, transposed to (in, out) by the row's
   transform (`Entry.layout`) and stacked: a Flax leaf of shape (layers, embed, q_heads) at
   params["generator"]["layers"]["q_proj"]["kernel"];
2. `cosmos_jax.sharding.param_specs` finds the row by that path (`entry_for_path`) and maps its logical axes
   ("layers", "embed", "q_heads") through the mesh preset's rules table (configs/mesh/<preset>.json, e.g.
   "embed" -> ["fsdp", "context"], "q_heads" -> "tensor") to a PartitionSpec, e.g. P(None, "fsdp", "tensor");
3. `cosmos_jax.convert.load` hands that sharding and the row's transform to `make_sharded_array`, so each device
   reads only its own slice of the stored bytes.

torch Linear weights are (out, in); Flax kernels are (in, out). The per-domain action weights are stored as
embeddings [domains, in*out] whose row reshapes to (in, out) (docs/model.md, "Conditioning per mode"). Rows that
exist only for some configs name the config `feature` that adds them (`FEATURES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.safetensors_io import Transpose
from cosmos_jax.convert.tree_paths import get_path, set_path

LINEAR = "linear"  # (out, in) <-> (in, out)
IDENTITY = "identity"
DOMAIN = "domain"  # (domains, in*out) <-> (domains, in, out)
LAYERS = "layers"  # the logical axis that per-layer rows stack their tensors on

LogicalAxes = tuple[str | None, ...]

# The config features that add rows; a row without a feature is in every checkpoint.
FEATURES: dict[str, Callable[[Cosmos3Config], bool]] = {
    "gated_mlp": lambda c: c.hidden_act == "silu",
    "text_qk_norm": lambda c: c.qk_norm_for_text,
    "und_k_norm_for_gen": lambda c: c.has_und_k_norm_for_gen,
    "sound": lambda c: c.sound_gen,
    "action": lambda c: c.action_gen,
}


class KeyMapError(ValueError):
    """State-dict keys or shapes do not match the model: lists every problem at once."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: torch key (with '{i}' for layer entries), Flax path (tower, ...), transform, the logical axes
    of one Flax tensor (one layer's for layer entries, which stack on a leading "layers" axis), and the config
    feature that adds the row (None: always present)."""

    torch_key: str
    path: tuple[str, ...]
    transform: str = IDENTITY
    per_layer: bool = False
    axes: LogicalAxes = ()
    feature: str | None = None

    def torch_keys(self, num_layers: int) -> list[str]:
        if self.per_layer:
            return [self.torch_key.format(i=i) for i in range(num_layers)]
        return [self.torch_key]

    def logical_axes(self) -> LogicalAxes:
        """Logical names of every dimension of the Flax leaf (the stacked one for layer entries)."""
        return ((LAYERS,) + self.axes) if self.per_layer else self.axes

    def applies_to(self, config: Cosmos3Config) -> bool:
        return self.feature is None or FEATURES[self.feature](config)

    def layout(self, flax_shape: tuple[int, ...]) -> Transpose | Callable[[np.ndarray], np.ndarray] | None:
        """The torch -> Flax layout change of one tensor of Flax shape `flax_shape` (one layer's for layer
        entries), in the form `make_sharded_array` takes: a `Transpose` (sliced through, so a device reads only
        its bytes), a reshape, or None when the layouts agree."""
        if self.transform == LINEAR:
            return Transpose((1, 0))
        if self.transform == DOMAIN:
            return lambda array: array.reshape(flax_shape)
        return None

    def to_flax(self, array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
        """One torch tensor -> its Flax layout (`flax_shape` is the per-layer shape for layer entries)."""
        layout = self.layout(flax_shape)
        return array if layout is None else np.ascontiguousarray(layout(array))

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        """The inverse of `to_flax`."""
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


def _layer_rows() -> Iterator[Entry]:
    prefix = "layers.{i}."
    towers = (
        ("reasoner", "", ("to_q", "to_k", "to_v", "to_out"), ("norm_q", "norm_k"), "text_qk_norm"),
        ("generator", "_moe_gen", ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
         ("norm_added_q", "norm_added_k"), None),
    )
    projection_axes = (("embed", "q_heads"), ("embed", "kv_heads"), ("embed", "kv_heads"), ("q_heads", "embed"))
    mlp_axes = {"gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed")}
    for tower, suffix, projections, qk_norms, qk_norm_feature in towers:
        for torch_name, flax_name, axes in zip(projections, ("q_proj", "k_proj", "v_proj", "o_proj"), projection_axes):
            yield Entry(f"{prefix}self_attn.{torch_name}.weight", (tower, "layers", flax_name, "kernel"), LINEAR, True,
                        axes)
        for torch_name, flax_name in zip(qk_norms, ("q_norm", "k_norm")):
            yield Entry(f"{prefix}self_attn.{torch_name}.weight", (tower, "layers", flax_name, "scale"),
                        per_layer=True, axes=("head_dim",), feature=qk_norm_feature)
        mlp = "mlp" + suffix
        for proj, axes in mlp_axes.items():
            yield Entry(f"{prefix}{mlp}.{proj}.weight", (tower, "layers", "mlp", proj, "kernel"), LINEAR, True, axes,
                        feature="gated_mlp" if proj == "gate_proj" else None)
        yield Entry(f"{prefix}input_layernorm{suffix}.weight", (tower, "layers", "input_norm", "scale"),
                    per_layer=True, axes=("norm",))
        yield Entry(
            f"{prefix}post_attention_layernorm{suffix}.weight",
            (tower, "layers", "post_attention_norm", "scale"),
            per_layer=True,
            axes=("norm",),
        )
    yield Entry("layers.{i}.self_attn.k_norm_und_for_gen.weight", ("generator", "layers", "und_k_norm", "scale"),
                per_layer=True, axes=("head_dim",), feature="und_k_norm_for_gen")


def _top_rows() -> Iterator[Entry]:
    yield Entry("embed_tokens.weight", ("reasoner", "embed_tokens", "embedding"), axes=("vocab", "embed"))
    yield Entry("norm.weight", ("reasoner", "norm", "scale"), axes=("norm",))
    yield Entry("lm_head.weight", ("reasoner", "lm_head", "kernel"), LINEAR, axes=("embed", "vocab"))
    yield Entry("norm_moe_gen.weight", ("generator", "norm", "scale"), axes=("norm",))
    yield Entry("audio_modality_embed", ("generator", "audio_modality_embed"), axes=("embed",), feature="sound")
    # (name, its (in, out) logical axes, feature)
    linears = (
        ("proj_in", ("patch", "embed"), None),
        ("proj_out", ("embed", "patch"), None),
        ("time_embedder.linear_1", ("time_freq", "embed"), None),
        ("time_embedder.linear_2", ("embed", "time_hidden"), None),
        ("audio_proj_in", ("sound", "embed"), "sound"),
        ("audio_proj_out", ("embed", "sound"), "sound"),
    )
    for name, axes, feature in linears:
        path = ("generator",) + tuple(name.split("."))
        yield Entry(f"{name}.weight", path + ("kernel",), LINEAR, axes=axes, feature=feature)
        yield Entry(f"{name}.bias", path + ("bias",), axes=axes[1:], feature=feature)
    for name, axes in (("action_proj_in", ("domain", "action", "embed")),
                       ("action_proj_out", ("domain", "embed", "action"))):
        yield Entry(f"{name}.fc.weight", ("generator", name, "kernel"), DOMAIN, axes=axes, feature="action")
        yield Entry(f"{name}.bias.weight", ("generator", name, "bias"), axes=(axes[0], axes[2]), feature="action")
    yield Entry("action_modality_embed", ("generator", "action_modality_embed"), axes=("embed",), feature="action")


ROWS: tuple[Entry, ...] = tuple(_top_rows()) + tuple(_layer_rows())
_ROW_BY_PATH = {entry.path: entry for entry in ROWS}


def key_table(config: Cosmos3Config) -> list[Entry]:
    """Every tensor of the diffusers transformer checkpoint for this config."""
    return [entry for entry in ROWS if entry.applies_to(config)]


def entry_for_path(path: tuple[str, ...]) -> Entry | None:
    """The row of the Flax leaf at `path` (e.g. ('generator', 'layers', 'q_proj', 'kernel')), or None."""
    return _ROW_BY_PATH.get(tuple(path))


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

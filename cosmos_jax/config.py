"""The Cosmos 3 transformer configuration, read from and written to the reference `transformer/config.json` keys.

Unknown keys in a published config (e.g. `freeze_und`, `use_moe`, `_diffusers_version`) are kept verbatim and
written back unchanged, so a config survives a load/save round trip byte for byte in content.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_CLASS_NAME = "Cosmos3OmniTransformer"


class ConfigError(ValueError):
    """A config value is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True, eq=False)
class Cosmos3Config:
    """Architecture of the two-tower Cosmos 3 transformer. Field names are the diffusers config keys."""

    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    rope_axes_dim: tuple[int, int, int] = (24, 20, 20)
    rope_scaling: Mapping[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    vocab_size: int = 151936
    qk_norm_for_text: bool = True
    use_und_k_norm_for_gen: bool = False
    latent_channel: int = 48
    latent_patch_size: int = 2
    patch_latent_dim: int = 192
    timestep_scale: float = 0.001
    base_fps: int = 24
    enable_fps_modulation: bool = True
    unified_3d_mrope_temporal_modality_margin: int = 15000
    unified_3d_mrope_reset_spatial_ids: bool = True
    action_gen: bool = False
    action_dim: int | None = None
    num_embodiment_domains: int = 32
    sound_gen: bool = False
    sound_dim: int | None = None
    sound_latent_fps: float = 25.0
    extra_json: str = "{}"
    source_keys: tuple[str, ...] | None = None
    rms_norm_variant: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes_dim", tuple(int(a) for a in self.rope_axes_dim))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))
        self.validate()

    def __hash__(self) -> int:
        return hash((json.dumps(self.to_dict(), sort_keys=True), self.rms_norm_variant))

    def __eq__(self, other: object) -> bool:
        """Equal when the architecture (the norm rounding included) and the written config.json content are equal."""
        return (isinstance(other, Cosmos3Config) and self.to_dict() == other.to_dict()
                and self.rms_norm_variant == other.rms_norm_variant)

    def validate(self) -> None:
        """Raise ConfigError naming every inconsistent key."""
        errors = []
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "latent_channel", "latent_patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if errors:
            raise ConfigError("invalid Cosmos3 config: " + "; ".join(errors))
        if self.num_attention_heads % self.num_key_value_heads:
            errors.append(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                          f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            errors.append(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.head_dim // 2:
            errors.append(f"rope_axes_dim {list(self.rope_axes_dim)} must have 3 entries summing to "
                          f"head_dim/2 = {self.head_dim // 2}")
        elif 3 * self.rope_axes_dim[1] - 2 >= self.head_dim // 2 or 3 * self.rope_axes_dim[2] - 1 >= self.head_dim // 2:
            errors.append(f"rope_axes_dim {list(self.rope_axes_dim)}: the interleaved H/W channels do not fit "
                          f"in head_dim/2 = {self.head_dim // 2}")
        if self.hidden_act not in ("silu", "relu2"):
            errors.append(f"hidden_act must be 'silu' or 'relu2', got {self.hidden_act!r}")
        expected_patch = self.latent_channel * self.latent_patch_size**2
        if self.patch_latent_dim != expected_patch:
            errors.append(f"patch_latent_dim ({self.patch_latent_dim}) must equal latent_channel * "
                          f"latent_patch_size**2 = {expected_patch}")
        if self.action_gen and (not isinstance(self.action_dim, int) or self.action_dim <= 0):
            errors.append(f"action_gen=True needs a positive action_dim, got {self.action_dim!r}")
        if self.action_gen and self.num_embodiment_domains <= 0:
            errors.append(f"num_embodiment_domains must be positive, got {self.num_embodiment_domains}")
        if self.sound_gen and (not isinstance(self.sound_dim, int) or self.sound_dim <= 0):
            errors.append(f"sound_gen=True needs a positive sound_dim, got {self.sound_dim!r}")
        if self.attention_bias:
            errors.append("attention_bias=True is not used by any released Cosmos 3 model and is not supported")
        if self.rms_norm_eps <= 0:
            errors.append(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rms_norm_variant not in (None, "diffusers", "nemotron", "llama"):
            errors.append(f"rms_norm_variant must be None, 'diffusers', 'nemotron' or 'llama', "
                          f"got {self.rms_norm_variant!r}")
        if errors:
            raise ConfigError("invalid Cosmos3 config: " + "; ".join(errors))

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def norm_variant(self) -> str:
        """The RMSNorm rounding: `rms_norm_variant` when set (transformers' Edge language model uses 'llama'),
        else as diffusers' transformer: 'nemotron' (fp32 throughout, Edge) or 'diffusers' (rounds to the weight
        dtype before the scale)."""
        if self.rms_norm_variant is not None:
            return self.rms_norm_variant
        return "nemotron" if self.hidden_act == "relu2" else "diffusers"

    @property
    def has_und_k_norm_for_gen(self) -> bool:
        return self.use_und_k_norm_for_gen and not self.qk_norm_for_text

    @property
    def extra(self) -> dict[str, Any]:
        return json.loads(self.extra_json)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Cosmos3Config":
        """Build from config.json content; unknown keys are kept in `extra`."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a Cosmos3 config must be a JSON object, got {type(raw).__name__}")
        class_name = raw.get("_class_name", _CLASS_NAME)
        if class_name != _CLASS_NAME:
            raise ConfigError(f"expected _class_name {_CLASS_NAME!r}, got {class_name!r}")
        known = _config_keys()
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known and k != "_class_name"}
        if kwargs.get("rope_axes_dim") is None:
            kwargs.pop("rope_axes_dim", None)
            scaling = raw.get("rope_scaling") or {}
            if "mrope_section" in scaling:
                kwargs["rope_axes_dim"] = tuple(scaling["mrope_section"])
        source_keys = tuple(sorted(k for k in raw if k in known))
        return cls(**kwargs, extra_json=json.dumps(extra, sort_keys=True), source_keys=source_keys)

    def to_dict(self) -> dict[str, Any]:
        """The config.json content: the keys it was read from plus any changed from the default (all keys for a
        config built in Python), values as held, and the unknown keys unchanged."""
        out: dict[str, Any] = {"_class_name": _CLASS_NAME}
        if self.source_keys is None:
            keys = _config_keys()
        else:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = {k for k in _config_keys() if getattr(self, k) != defaults[k] and k != "rope_axes_dim"}
            keys = set(self.source_keys) | changed
        for name in sorted(keys):
            value = getattr(self, name)
            if name == "rope_axes_dim":
                value = list(value)
            if isinstance(value, _FrozenDict):
                value = dict(value)
            out[name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Cosmos3Config":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(raw)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)


def _config_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(Cosmos3Config)} - {"extra_json", "source_keys", "rms_norm_variant"}


class _FrozenDict(dict):
    """A dict that refuses mutation, so a frozen config stays frozen."""

    def _immutable(self, *args, **kwargs):
        raise TypeError("Cosmos3Config.rope_scaling is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _immutable

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True))


F32_PARAMETERS = ("time_embedder",)


def param_dtype(path: Sequence[str], dtype: Any) -> Any:
    """The dtype policy: the dtype a transformer parameter at `path` (tree keys) is held in when the model runs in
    `dtype`. The time embedder stays float32 at every precision, as the reference keeps it (docs/model.md,
    "Rounding and timestep details"); every other parameter is `dtype`."""
    return np.float32 if any(name in F32_PARAMETERS for name in path) else dtype


def _presets_dir() -> str:
    """The presets folder: `cosmos_jax/configs/` in an installed wheel (setup.py copies the top-level `configs/`
    there at build time), else the checkout's top-level `configs/` (a source tree or an editable install)."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, "configs")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "configs")


PRESETS_DIR = _presets_dir()


def load_preset(name_or_path: str | os.PathLike) -> Cosmos3Config:
    """A preset by name ('edge', 'nano', 'super', 'tiny': configs/<name>.json) or a config.json path."""
    path = os.fspath(name_or_path)
    if not os.path.exists(path):
        path = os.path.join(PRESETS_DIR, f"{path}.json")
    if not os.path.isfile(path):
        available = sorted(f.removesuffix(".json") for f in os.listdir(PRESETS_DIR) if f.endswith(".json")) \
            if os.path.isdir(PRESETS_DIR) else []
        raise ConfigError(f"unknown preset or config file {name_or_path!r}; presets: {', '.join(available)}")
    return Cosmos3Config.from_json(path)

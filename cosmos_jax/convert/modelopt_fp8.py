"""The published FP8 revision of the transformer: ModelOpt E4M3 weights with one scale per tensor, and its policy.

Layout (as ModelOpt's serialized diffusers export writes it): a quantized linear `X` stores `X.weight` as
float8_e4m3fn plus `X.weight_quantizer._scale` (one float32 value), with `X.weight_quantizer._amax` and
`X.input_quantizer._amax` beside it; everything else is stored as usual. `transformer/config.json` carries
`quantization_config` (quant_method "modelopt", quant_type/quant_algo FP8) whose optional
`runtime.diffusion_step_policy` turns on the per-step W8A16/W8A8 schedule.

Layer linears stay quantized as `Fp8Kernel`s (cosmos_jax/modeling/weights.py: E4M3 values [L, in, out], the
W8A16 scale `_scale` [L, 1, 1] in the activation dtype, and the float32 W8A8 scales weight amax / 448 and input
amax / 448, as ModelOpt's FP8 GEMM computes them). A W8A16 step dequantizes them in the layer loop as
`w.astype(x.dtype) * scale`; a W8A8 step quantizes the activations to E4M3 and multiplies the two float8 operands
(cosmos_jax/modeling/linear.py). The generator's modality projections (`proj_in`, `proj_out`, `audio_proj_in`,
`audio_proj_out`) stay `Fp8Kernel`s too, in group "native": the reference's runtime leaves them out of its groups,
so they run ModelOpt's native forward, W8A8, at every step (W8A16 where the backend has no fp8 matmuls). Other
quantized linears (the time embedder and the LM head, which ModelOpt's export keeps in full precision anyway) are
dequantized once at load with the W8A16 formula, in their target dtype.

The schedule: the first and last N denoising steps run W8A16, the rest W8A8. Linears fall into two groups by the
reference's rule, which pairs them across the towers: "generation" = the reasoner tower's attention projections
(`self_attn.to_q/to_k/to_v/to_out`) plus the generator's MLP (`mlp_moe_gen`); "reasoner" = the generator's
attention projections (`add_*_proj`, `to_add_out`) plus the reasoner's MLP. The "generation" group follows the
schedule; the "reasoner" group is W8A16 at every step under the reasoner policy "a16", else W8A8 at every step
(`StepPolicy.w8a8_groups`); "native" is W8A8 at every step. Running W8A8 needs fp8 matmuls (`has_fp8_matmul`:
CUDA compute capability >= 8.9, or TPU); where the backend has none (CPU), every step runs W8A16 and
`fallback_note` says so, unless W8A8 is asked for explicitly (`fp8_matmul=True`), which XLA:CPU computes by
upcasting the float8 operands.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import qwix

from cosmos_jax.config import ConfigError, Cosmos3Config, param_dtype
from cosmos_jax.convert.keymap_transformer import LINEAR, KeyMapError, check_state, key_table
from cosmos_jax.convert.quantize import is_quantized_path
from cosmos_jax.convert.safetensors_io import CheckpointIndex
from cosmos_jax.convert.tree_paths import get_path, set_path
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.modeling.weights import Fp8Kernel

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
WEIGHT_SCALE = "weight_quantizer._scale"
WEIGHT_AMAX = "weight_quantizer._amax"
INPUT_AMAX = "input_quantizer._amax"
GROUPS = ("generation", "reasoner")
NATIVE = "native"  # FP8 linears outside the reference's groups: its runtime leaves them on the native W8A8 forward
NATIVE_LINEARS = frozenset({("generator", name, "kernel")
                            for name in ("proj_in", "proj_out", "audio_proj_in", "audio_proj_out")})
QUANTIZER_SUFFIXES = ("weight_quantizer._scale", "weight_quantizer._amax", "input_quantizer._amax",
                      "input_quantizer._scale")
W8A16, W8A8 = "W8A16", "W8A8"
POLICY_FIELDS = ("schema_version", "type", "index_space", "scope", "default_mode", "first_steps", "last_steps",
                 "overlap", "reasoner")
WHERE = "quantization_config.runtime.diffusion_step_policy"


@dataclasses.dataclass(frozen=True)
class StepPolicy:
    """first_steps/last_steps: W8A16 windows; overlap_a16: a step in both windows runs W8A16; reasoner_a16: the
    "reasoner" group is W8A16 at every step."""

    first_steps: int = 3
    last_steps: int = 3
    overlap_a16: bool = True
    reasoner_a16: bool = True

    def generation_precision(self, step: int, num_steps: int) -> str:
        """W8A16 or W8A8 for the "generation" group at `step` of `num_steps` (a 1-step run keeps W8A8)."""
        if not 0 <= step < num_steps:
            raise IndexError(f"step must be in [0, {num_steps}), got {step}")
        if num_steps == 1:
            return W8A8
        first, last = step < self.first_steps, step >= num_steps - self.last_steps
        if first and last:
            return W8A16 if self.overlap_a16 else W8A8
        return W8A16 if first or last else W8A8

    def schedule(self, num_steps: int) -> list[str]:
        return [self.generation_precision(i, num_steps) for i in range(num_steps)]

    def w8a8_groups(self, step: int, num_steps: int) -> frozenset[str]:
        """The linear groups that run W8A8 at `step`: "generation" on the schedule's W8A8 steps, "reasoner" at
        every step unless the reasoner policy is "a16"."""
        groups = {"generation"} if self.generation_precision(step, num_steps) == W8A8 else set()
        return frozenset(groups if self.reasoner_a16 else groups | {"reasoner"})


def _mode(value: Any, field: str) -> str:
    if value not in ("a16", "native"):
        raise ConfigError(f"{WHERE}.{field}: must be 'a16' or 'native', got {value!r}")
    return value


def _window(spec: Any, field: str) -> int:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{WHERE}.{field}: must be an object with count and mode, got {spec!r}")
    mode = _mode(spec.get("mode"), f"{field}.mode")
    count = spec.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ConfigError(f"{WHERE}.{field}.count: must be a non-negative integer, got {count!r}")
    return count if mode == "a16" else 0


def parse_policy(raw: Any) -> StepPolicy:
    """Validate a `diffusion_step_policy` (schema 1, type first_last_n); ConfigError naming the field otherwise."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{WHERE}: must be an object, got {raw!r}")
    missing = [f for f in POLICY_FIELDS if f not in raw]
    if missing:
        raise ConfigError(f"{WHERE}: missing field(s) {', '.join(missing)}")
    expected = {"schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration",
                "default_mode": "native"}
    for field, want in expected.items():
        if raw[field] != want:
            raise ConfigError(f"{WHERE}.{field}: unknown policy {raw[field]!r} (supported: {want!r})")
    if raw["scope"] != ["transformer"]:
        raise ConfigError(f"{WHERE}.scope: supported scope is ['transformer'], got {raw['scope']!r}")
    return StepPolicy(
        first_steps=_window(raw["first_steps"], "first_steps"),
        last_steps=_window(raw["last_steps"], "last_steps"),
        overlap_a16=_mode(raw["overlap"], "overlap") == "a16",
        reasoner_a16=_mode(raw["reasoner"], "reasoner") == "a16",
    )


def quantization_config(config: Cosmos3Config) -> Mapping[str, Any] | None:
    """The transformer config's `quantization_config`, or None for a full-precision checkpoint."""
    return config.extra.get("quantization_config")


def read_policy(config: Cosmos3Config) -> StepPolicy | None:
    """The validated step policy of an FP8 revision (None: no policy, native W8A8 at every step).

    ConfigError for a quantization method other than ModelOpt FP8 or an invalid policy."""
    raw = quantization_config(config)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"quantization_config: must be an object, got {raw!r}")
    method = raw.get("quant_method")
    algo = str(raw.get("quant_algo") or raw.get("quant_type") or "").upper()
    if method != "modelopt" or "FP8" not in algo:
        raise ConfigError(f"quantization_config: only ModelOpt FP8 is supported, got quant_method={method!r}, "
                          f"quant_type/quant_algo={algo or None!r}")
    runtime = raw.get("runtime")
    if runtime is None:
        return None
    if not isinstance(runtime, Mapping):
        raise ConfigError(f"quantization_config.runtime: must be an object or null, got {runtime!r}")
    policy = runtime.get("diffusion_step_policy")
    return None if policy is None else parse_policy(policy)


def linear_group(torch_key: str) -> str | None:
    """"generation", "reasoner" or None for a diffusers transformer module name (the reference's grouping)."""
    generation = (".self_attn.to_q", ".self_attn.to_k", ".self_attn.to_v", ".self_attn.to_out")
    reasoner = (".self_attn.add_q_proj", ".self_attn.add_k_proj", ".self_attn.add_v_proj", ".self_attn.to_add_out")
    if ".mlp_moe_gen." in torch_key or torch_key.endswith(generation):
        return "generation"
    if ".mlp." in torch_key or torch_key.endswith(reasoner):
        return "reasoner"
    return None


def has_native_kernels(params: Any) -> bool:
    """Whether a loaded FP8 revision's trees hold FP8 modality projections (group "native")."""
    return any(isinstance(leaf, Fp8Kernel) and leaf.group == NATIVE
               for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Fp8Kernel)))


def has_fp8_matmul(device: Any = None) -> bool:
    """Whether `device` (default: the first device) runs float8 x float8 matmuls natively: a CUDA GPU of compute
    capability >= 8.9 (Ada, Hopper and later) or a TPU; not a CPU, nor a GPU that reports no CUDA capability."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "tpu":
        return True
    if device.platform not in ("gpu", "cuda"):
        return False
    try:
        major, minor = (int(part) for part in str(getattr(device, "compute_capability", "")).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (8, 9)


def step_w8a8_groups(policy: StepPolicy | None, num_steps: int, fp8_matmul: bool) -> tuple[frozenset[str], ...]:
    """Per denoising step, the linear groups that run W8A8: the policy's (no policy: both groups, native W8A8 at
    every step) and "native" at every step, or none at all without fp8 matmuls."""
    if not fp8_matmul:
        return (frozenset(),) * num_steps
    if policy is None:
        return (frozenset(GROUPS) | {NATIVE},) * num_steps
    return tuple(policy.w8a8_groups(i, num_steps) | {NATIVE} for i in range(num_steps))


def fallback_note(policy: StepPolicy | None, num_steps: int, fp8_matmul: bool | None = None,
                  native: bool = False) -> str | None:
    """What the run does instead of the W8A8 steps (None when it runs them, or every step already is W8A16).

    fp8_matmul: None = the backend decides (`has_fp8_matmul`); False = W8A8 turned off.
    native: the checkpoint has FP8 modality projections (group "native", W8A8 at every step)."""
    planned = policy.schedule(num_steps) if policy is not None else [W8A8] * num_steps
    if W8A8 not in planned and not native:
        return None
    backend = has_fp8_matmul()
    if fp8_matmul or (fp8_matmul is None and backend):
        return None
    device = jax.devices()[0]
    reason = ("W8A8 is turned off (fp8_matmul=False)" if backend
              else "the CPU backend has no fp8 matmuls" if device.platform == "cpu"
              else f"{device.device_kind} has no fp8 matmuls")
    projections = ", and its modality projections W8A8 at every step" if native else ""
    return (f"FP8 revision: {planned.count(W8A8)} of {num_steps} steps are W8A8 in the checkpoint's schedule"
            f"{projections}; this run does every step W8A16 (weights dequantized to the activation dtype): {reason}")


# ------------------------------------------------------------------------------------------- reading


def _fp8_reader(index: CheckpointIndex):
    """key -> float8_e4m3fn array, read from the file bytes (numpy's safetensors binding has no fp8)."""
    headers: dict[Path, tuple[int, dict[str, Any]]] = {}

    def read(key: str) -> np.ndarray:
        info = index.info(key)
        if info.file not in headers:
            with open(info.file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                headers[info.file] = (8 + length, json.loads(f.read(length)))
        start, header = headers[info.file]
        begin, _ = header[key]["data_offsets"]
        raw = np.fromfile(info.file, dtype=np.uint8, count=info.nbytes, offset=start + begin)
        return raw.view(FP8).reshape(info.shape)

    return read


def _weight_scale(index: CheckpointIndex, weight_key: str) -> np.ndarray:
    key = weight_key.removesuffix("weight") + WEIGHT_SCALE
    if key not in index:
        raise KeyMapError(f"{index.source}: {weight_key} is float8_e4m3fn but its scale {key} is missing")
    scale = index.read(key)
    if scale.size != 1:
        raise KeyMapError(f"{index.source}: {key} must be one per-tensor scale, got shape {tuple(scale.shape)}")
    return np.asarray(scale, np.float32).reshape(())


def _optional_scale(index: CheckpointIndex, key: str) -> np.ndarray | None:
    """A per-tensor amax buffer as its FP8 scale amax / 448 (float32, as ModelOpt computes it); None if absent."""
    if key not in index:
        return None
    amax = np.asarray(index.read(key), np.float32)
    if amax.size != 1:
        raise KeyMapError(f"{index.source}: {key} must be one per-tensor amax, got shape {tuple(amax.shape)}")
    if not np.isfinite(amax).all() or float(amax.reshape(())) <= 0:
        raise KeyMapError(f"{index.source}: {key} must be a positive finite amax, got {float(amax.reshape(()))}")
    return amax.reshape(()) / np.float32(448.0)


def _fp8_kernel(index: CheckpointIndex, entry: Any, keys: list[str], values: np.ndarray, scales: np.ndarray,
                target: np.dtype) -> Fp8Kernel:
    """An FP8 linear with its W8A16 scale and its W8A8 weight/input scales: a stacked layer linear [L, in, out]
    (scales [L, 1, 1]), or a modality projection [1, in, out] (scales [1, 1, 1]) returned without the layer
    axis."""
    group = NATIVE if entry.path in NATIVE_LINEARS else linear_group(entry.torch_key.removesuffix(".weight"))
    if group is None:
        raise KeyMapError(f"{index.source}: {entry.torch_key} is float8 but belongs to no W8A8 linear group")
    prefixes = [k.removesuffix("weight") for k in keys]
    weight_amax = [_optional_scale(index, p + WEIGHT_AMAX) for p in prefixes]
    weight_scale = np.stack([s if a is None else a for s, a in zip(scales.reshape(-1), weight_amax)])
    inputs = [_optional_scale(index, p + INPUT_AMAX) for p in prefixes]
    if any(x is None for x in inputs) and not all(x is None for x in inputs):
        missing = [p + INPUT_AMAX for p, x in zip(prefixes, inputs) if x is None]
        raise KeyMapError(f"{index.source}: {entry.torch_key}: some layers have a calibrated input amax, "
                          f"others not ({', '.join(missing)} missing)")
    input_scale = None if inputs[0] is None else np.stack(inputs).reshape(scales.shape)
    weight_scale = weight_scale.reshape(scales.shape)
    if not entry.per_layer:
        values, scales, weight_scale = values[0], scales[0], weight_scale[0]
        input_scale = None if input_scale is None else input_scale[0]
    return Fp8Kernel(
        weight=qwix.QArray(qvalue=jax.numpy.asarray(values), scale=jax.numpy.asarray(scales, target),
                           qtype=jax.numpy.float8_e4m3fn),
        weight_scale=jax.numpy.asarray(weight_scale),
        input_scale=None if input_scale is None else jax.numpy.asarray(input_scale), group=group)


def _check_keys(index: CheckpointIndex, config: Cosmos3Config, abstract: Any) -> None:
    """Every tensor besides the quantizer buffers matches the key table; quantizer buffers belong to a weight."""
    plain = {k: index.shape(k) for k in index.keys() if not k.endswith(QUANTIZER_SUFFIXES)}
    check_state(plain, config, abstract)
    orphans = [k for k in index.keys() if k.endswith(QUANTIZER_SUFFIXES)
               and k.rsplit(".", 2)[0] + ".weight" not in plain]
    if orphans:
        raise KeyMapError(f"{index.source}: quantizer buffers without a weight: {', '.join(sorted(orphans))}")
    bad = [f"{k} ({index.dtype(k)})" for k in plain
           if index.dtype(k) == FP8 and not (k.endswith(".weight") or k.endswith(".fc.weight"))]
    if bad:
        raise KeyMapError(f"{index.source}: float8 tensors that are not linear weights: {', '.join(bad)}")


def load_transformer(folder: Path, config: Cosmos3Config, dtype: Any) -> dict[str, Any]:
    """Both trees from an FP8 revision folder: layer linears as `Fp8Kernel`s (E4M3 values, per-layer per-tensor
    scales), every other leaf in its target dtype (time embedder f32)."""
    if dtype is None:
        raise ValueError("an FP8 revision needs a compute dtype (dtype=None would keep float8 weights)")
    abstract = Cosmos3Transformer(config, dtype=jax.numpy.float32).abstract_params()
    params: dict[str, Any] = {}
    with CheckpointIndex.open(folder) as index:
        _check_keys(index, config, abstract)
        read_fp8 = _fp8_reader(index)
        for entry in key_table(config):
            keys = entry.torch_keys(config.num_hidden_layers)
            shape = tuple(get_path(abstract, entry.path).shape)
            layer_shape = shape[1:] if entry.per_layer else shape
            target = np.dtype(param_dtype(entry.path, dtype))
            fp8 = [index.dtype(k) == FP8 for k in keys]
            if any(fp8) and (entry.transform != LINEAR or not all(fp8)):
                raise KeyMapError(f"{index.source}: {entry.torch_key}: float8 weights must be whole linears "
                                  "(every layer quantized)")
            if not any(fp8):
                arrays = [entry.to_flax(index.read(k), layer_shape).astype(target) for k in keys]
                value: Any = jax.numpy.asarray(np.stack(arrays) if entry.per_layer else arrays[0])
            else:
                values = np.stack([read_fp8(k).T for k in keys])
                scales = np.stack([_weight_scale(index, k) for k in keys]).reshape(len(keys), 1, 1)
                if is_quantized_path(entry.path) or entry.path in NATIVE_LINEARS:
                    value = _fp8_kernel(index, entry, keys, values, scales, target)
                else:
                    if not entry.per_layer:
                        values, scales = values[0], scales[0]
                    value = qwix.dequantize(qwix.QArray(qvalue=jax.numpy.asarray(values),
                                                        scale=jax.numpy.asarray(scales, target),
                                                        qtype=jax.numpy.float8_e4m3fn))
            set_path(params, entry.path, value)
            index.close()
    return params

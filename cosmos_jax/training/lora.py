"""LoRA adapters on the transformer's layer linears: config, init, attach/merge, save/load, fingerprint.

A small wrapper over the parameter tree rather than qwix's LoRA provider: qwix adds adapters by intercepting
Flax module calls inside a model it rewrites, while this model applies each scanned layer with its own stacked
parameters (`layer.apply` inside `lax.scan`). Holding the adapters beside the base kernels (`LowRankUpdate`,
materialized one layer at a time in the scan) keeps the stacks, the sharding and the model code unchanged.

Targets are the layer linears of either tower (stacked kernels [L, in, out]) and the generator's modality
projections: proj_in/proj_out [in, out], audio_proj_in/out [in, out] and action_proj_in/out [domains, in, out]
(one adapter pair per embodiment domain). Adapters: {tower: {"layers": {<linear>: {"kernel": {"a": [L, in, r],
"b": [L, r, out]}}}}} (MLP linears under "mlp") and {"generator": {<projection>: {"kernel": {"a": [..., in, r],
"b": [..., r, out]}}}}, fp32. kernel' = kernel + (alpha / r) * a @ b; b starts at zero, so training starts from
the base model.
Saved as a folder: adapter.safetensors (those leaves, keyed by their path) + adapter.json (rank, alpha, targets
and the base weights' fingerprint), each written to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.convert.quantize import LAYER_LINEARS
from cosmos_jax.convert.tree_paths import get_path, set_path
from cosmos_jax.modeling.weights import LowRankUpdate, is_held

TOWERS = ("generator", "reasoner")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ("proj_in", "proj_out", "audio_proj_in", "audio_proj_out", "action_proj_in", "action_proj_out")
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
FORMAT = "cosmos-jax-lora/1"

Params = dict[str, Any]
LeafPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r >= 1; alpha (scale alpha / r; default r, i.e. 1); targets: kernel paths (tower, "layers", ...)."""

    rank: int
    targets: tuple[LeafPath, ...]
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if not self.targets:
            raise ValueError("--lora-targets selects no linear")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def parse_targets(rules: str) -> tuple[LeafPath, ...]:
    """'q_proj,v_proj,reasoner/up_proj,action_proj_in' -> kernel paths; a name without a tower means the
    generator's. The modality projections (PROJECTIONS) are the generator's only."""
    paths = []
    for rule in (r.strip() for r in rules.split(",")):
        tower, _, name = rule.rpartition("/")
        tower = tower or "generator"
        if name in PROJECTIONS and tower == "generator":
            path: LeafPath = (tower, name, "kernel")
        elif tower in TOWERS and name in LAYER_LINEARS:
            path = (tower, "layers", "mlp", name, "kernel") if name in MLP_LINEARS else (tower, "layers", name, "kernel")
        else:
            raise ValueError(f"--lora-targets {rule!r}: use [generator/|reasoner/]NAME with NAME one of "
                             f"{', '.join(sorted(LAYER_LINEARS))}, or a generator projection: "
                             f"{', '.join(PROJECTIONS)}")
        if path not in paths:
            paths.append(path)
    return tuple(paths)


def _targets_present(params: Params, targets: Iterable[LeafPath]) -> list[LeafPath]:
    present = []
    for path in targets:
        try:
            get_path(params, path)
        except (KeyError, TypeError):
            raise ValueError(f"--lora-targets: the model has no {'/'.join(path)} (gate_proj needs a silu MLP, "
                             "audio_* sound generation, action_* action generation)") from None
        present.append(path)
    return present


def init_adapters(params: Params, config: LoraConfig, key: jax.Array) -> Params:
    """Fresh fp32 adapters for `config.targets`: a ~ N(0, 1/in), b = 0, with the kernel's leading axes (layers or
    domains; none for a plain projection)."""
    adapters: Params = {}
    paths = _targets_present(params, config.targets)
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        *lead, n_in, n_out = get_path(params, path).shape
        a = jax.random.normal(k, (*lead, n_in, config.rank), jnp.float32) / np.sqrt(n_in)
        set_path(adapters, path, {"a": a, "b": jnp.zeros((*lead, config.rank, n_out), jnp.float32)})
    return adapters


def adapter_paths(adapters: Params) -> list[LeafPath]:
    """The kernel paths an adapter tree updates."""
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    return sorted({tuple(str(k.key) for k in keys[:-1]) for keys, _ in flat})


def attach(params: Params, adapters: Sequence[tuple[Params, float]]) -> Params:
    """`params` with every adapted kernel a `LowRankUpdate` (adapters concatenated along the rank, each b times its
    scale); the base leaves are the same arrays (no copy)."""
    out = jax.tree.map(lambda x: x, params, is_leaf=is_held)
    for path in sorted({p for tree, _ in adapters for p in adapter_paths(tree)}):
        parts = [(get_path(tree, path), scale) for tree, scale in adapters if path in adapter_paths(tree)]
        a = jnp.concatenate([p["a"] for p, _ in parts], axis=-1)
        b = jnp.concatenate([p["b"] * scale for p, scale in parts], axis=-2)
        set_path(out, path, LowRankUpdate(base=get_path(params, path), a=a, b=b))
    return out


def merge(params: Params, adapters: Sequence[tuple[Params, float]]) -> Params:
    """`attach` then fold every update into its kernel (a plain tree again)."""
    attached = attach(params, adapters)
    return jax.tree.map(lambda x: x.materialize() if isinstance(x, LowRankUpdate) else x, attached, is_leaf=is_held)


def fingerprint(params: Params) -> str:
    """sha256 over every leaf's path, shape and up to 4096 strided values rounded to bf16: names the base weights
    an adapter was trained on without moving every byte of a large model to the host, and gives the same answer
    whether a bf16 checkpoint was loaded in bf16 or fp32."""
    digest = hashlib.sha256()
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update("/".join(str(getattr(k, "key", k)) for k in keys).encode())
        digest.update(str(tuple(leaf.shape)).encode())
        flat = jnp.ravel(leaf)
        sample = flat[:: max(1, flat.size // 4096)].astype(jnp.bfloat16).astype(jnp.float32)
        digest.update(np.asarray(jax.device_get(sample)).tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_adapters(folder: str | os.PathLike, adapters: Params, config: LoraConfig, base_fingerprint: str) -> Path:
    """Write adapter.safetensors + adapter.json under `folder` (created)."""
    from safetensors.numpy import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"/".join((*path, part)): np.asarray(jax.device_get(get_path(adapters, path)[part]), np.float32)
               for path in adapter_paths(adapters) for part in ("a", "b")}
    _atomic_write(folder / ADAPTER_FILE, save(tensors))
    meta = {"format": FORMAT, "rank": config.rank, "alpha": config.rank if config.alpha is None else config.alpha,
            "targets": ["/".join(p) for p in adapter_paths(adapters)], "base_fingerprint": base_fingerprint}
    _atomic_write(folder / CONFIG_FILE, json.dumps(meta, indent=1).encode())
    return folder


@dataclasses.dataclass(frozen=True)
class SavedAdapter:
    adapters: Params
    config: LoraConfig
    base_fingerprint: str


def load_adapters(folder: str | os.PathLike) -> SavedAdapter:
    """Read a folder written by `save_adapters` (ValueError naming the file for anything malformed)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta_path, tensor_path = folder / CONFIG_FILE, folder / ADAPTER_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"--lora {folder}: not a LoRA folder (needs {CONFIG_FILE} and {ADAPTER_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} adapter config")
    targets = tuple(tuple(t.split("/")) for t in meta.get("targets", []))
    config = LoraConfig(rank=meta.get("rank"), targets=targets, alpha=float(meta.get("alpha")))
    tensors = load_file(str(tensor_path))
    expected = {"/".join((*t, part)) for t in targets for part in ("a", "b")}
    if set(tensors) != expected:
        raise ValueError(f"{tensor_path}: tensors {sorted(set(tensors) ^ expected)} do not match the targets")
    adapters: Params = {}
    for target in targets:
        a, b = tensors["/".join((*target, "a"))], tensors["/".join((*target, "b"))]
        if a.ndim != b.ndim or a.ndim not in (2, 3) or a.shape[-1] != config.rank or b.shape[-2] != config.rank:
            raise ValueError(f"{tensor_path}: {'/'.join(target)} has shapes {a.shape}, {b.shape}, not rank "
                             f"{config.rank} pairs")
        set_path(adapters, target, {"a": jnp.asarray(a), "b": jnp.asarray(b)})
    return SavedAdapter(adapters, config, str(meta.get("base_fingerprint", "")))


def parse_lora_arg(value: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' -> (path, scale); ValueError naming --lora."""
    path, sep, scale = value.rpartition(":")
    if not sep or os.path.isdir(value):
        return value, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise ValueError(f"--lora {value!r}: the scale after ':' must be a number") from None


def check_base(saved: SavedAdapter, base_fingerprint: str, where: str) -> None:
    if saved.base_fingerprint != base_fingerprint:
        raise ValueError(f"--lora {where}: trained on base weights {saved.base_fingerprint[:12]}, but the model's "
                         f"are {base_fingerprint[:12]}")


def check_shapes(params: Params, adapters: Params, where: str) -> None:
    """Each adapter pair fits its kernel ([..., in, out]: a [..., in, r], b [..., r, out])."""
    for path in adapter_paths(adapters):
        try:
            kernel = get_path(params, path)
        except (KeyError, TypeError):
            raise ValueError(f"--lora {where}: the model has no {'/'.join(path)}") from None
        a, b = get_path(adapters, path)["a"], get_path(adapters, path)["b"]
        shape = tuple(kernel.shape)
        if a.shape[:-1] != shape[:-1] or (*b.shape[:-2], b.shape[-1]) != (*shape[:-2], shape[-1]):
            raise ValueError(f"--lora {where}: {'/'.join(path)} adapters {a.shape}, {b.shape} do not fit the kernel "
                             f"{tuple(kernel.shape)}")


# ------------------------------------------------------------------------------------------- training


def lora_train_step_fn(model: Any, optimizer: Any, loss_config: Any, optim: Any, scale: float):
    """The pure LoRA step: (state, batch, base) -> (state, metrics). `state.params` are the fp32 adapters (the
    optimizer state is theirs alone); `base` the frozen weights, which get no gradient."""
    import optax

    from cosmos_jax.training.losses import random_flow_loss
    from cosmos_jax.training.step import (
        TrainState,
        compute_params,
        learning_rate_schedule,
        mean_gradients,
    )

    schedule = learning_rate_schedule(optim)

    def step(state: TrainState, batch: Any, base: Params) -> tuple[TrainState, dict[str, jax.Array]]:
        frozen = jax.lax.stop_gradient(base)

        def loss_fn(adapters: Params, micro: Any, key: jax.Array):
            params = attach(frozen, [(adapters, scale)])
            return random_flow_loss(model, compute_params(params, model.dtype), micro, key, loss_config)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        grads, parts = mean_gradients(grad_fn, state.params, batch, jax.random.fold_in(state.rng, state.step),
                                      optim.grad_accum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        adapters = optax.apply_updates(state.params, updates)
        metrics = {f"loss/{k}": v for k, v in parts.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=adapters, opt_state=opt_state, ema=None, rng=state.rng), metrics

    return step


def trainable_counts(adapters: Params, opt_state: Any) -> dict[str, int]:
    """Parameters and optimizer-state bytes of a LoRA run (for the record beside a full fine-tune)."""
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
    opt_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt_state))
    return {"trainable_parameters": count, "optimizer_bytes": opt_bytes}


def apply_adapters(params: Params, specs: Sequence[tuple[SavedAdapter, float, str]], merge_now: bool) -> Params:
    """Base `params` with saved adapters (each with its scale) attached, or folded in when `merge_now`; each is
    checked against the base's fingerprint and kernel shapes first."""
    base_fingerprint = fingerprint(params)
    pairs = []
    for saved, scale, where in specs:
        check_base(saved, base_fingerprint, where)
        check_shapes(params, saved.adapters, where)
        pairs.append((saved.adapters, scale * saved.config.scale))
    return merge(params, pairs) if merge_now else attach(params, pairs)

"""The train state and a jitted, sharded train step (AdamW, warmup + cosine, clipping, EMA, accumulation).

Precision: the state holds fp32 master weights and fp32 Adam moments; the forward runs on a bf16 (compute dtype)
cast of the masters, except the time embedder which the model always keeps in f32. Freezing the reasoner tower
(the reference default) labels the top-level "reasoner" subtree `frozen` in an `optax.multi_transform`
(no update, no optimizer state) and stops its gradient, so the backward never differentiates through its weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cosmos_jax.modeling.transformer import Cosmos3Transformer, cast_params
from cosmos_jax.training.losses import LossConfig, TrainBatch, random_flow_loss

Params = dict[str, Any]
TOWERS = ("reasoner", "generator")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `end_lr_fraction`·lr; global-norm clipping; optional EMA."""

    lr: float = 1e-4
    warmup_steps: int = 100
    total_steps: int = 10_000
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    ema_decay: float | None = None
    freeze_reasoner: bool = True
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {self.total_steps}, "
                             f"{self.warmup_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")


@flax.struct.dataclass
class TrainState:
    """step [] int32; params: fp32 masters; opt_state; ema: fp32 EMA of params or None; rng: raw uint32[2] key."""

    step: jax.Array
    params: Params
    opt_state: Any
    ema: Params | None
    rng: jax.Array


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine to end_lr_fraction·lr at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, config.warmup_steps + 1),
        end_value=config.lr * config.end_lr_fraction,
    )


def tower_labels(params: Params, freeze_reasoner: bool) -> Params:
    """'frozen' for every leaf of the reasoner tower when frozen, else 'train' (top-level keys only)."""
    unknown = set(params) - set(TOWERS)
    if unknown:
        raise ValueError(f"parameter tree has unexpected top-level keys {sorted(unknown)}; expected {TOWERS}")
    label = lambda tower: "frozen" if freeze_reasoner and tower == "reasoner" else "train"  # noqa: E731
    return {k: jax.tree.map(lambda _, t=k: label(t), v) for k, v in params.items()}


def make_optimizer(config: OptimConfig, params: Params) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (trainable towers) / set_to_zero (frozen tower)."""
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
    )
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                              tower_labels(params, config.freeze_reasoner)),
    )


def init_state(params: Params, optimizer: optax.GradientTransformation, config: OptimConfig, seed: int) -> TrainState:
    """A fresh state from parameters (cast to fp32 masters)."""
    masters = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=masters,
        opt_state=optimizer.init(masters),
        ema=jax.tree.map(jnp.copy, masters) if config.ema_decay is not None else None,
        rng=jax.random.PRNGKey(seed),
    )


def compute_params(params: Params, dtype: Any) -> Params:
    """The forward's copy of the fp32 masters, cast by the dtype policy (`cosmos_jax.config.param_dtype`)."""
    return cast_params(params, dtype)


def _split_microbatches(batch: TrainBatch, accum: int) -> TrainBatch:
    """[B, ...] -> [accum, B/accum, ...] on every leaf."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % accum:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={accum}")
        return x.reshape((accum, x.shape[0] // accum) + x.shape[1:])

    return jax.tree.map(split, batch)


def train_step_fn(
    model: Cosmos3Transformer, optimizer: optax.GradientTransformation, loss_config: LossConfig, config: OptimConfig
) -> Callable[[TrainState, TrainBatch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step: (state, batch [B, ...]) -> (state, metrics). B splits into grad_accum microbatches whose
    gradients are averaged; σ and ε come from fold_in(state.rng, step) and the microbatch index."""
    schedule = learning_rate_schedule(config)

    def loss_fn(masters: Params, micro: TrainBatch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        if config.freeze_reasoner:
            masters = {**masters, "reasoner": jax.lax.stop_gradient(masters["reasoner"])}
        return random_flow_loss(model, compute_params(masters, model.dtype), micro, key, loss_config)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: TrainBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        grads, parts = mean_gradients(grad_fn, state.params, batch, jax.random.fold_in(state.rng, state.step),
                                      config.grad_accum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = config.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        metrics = {f"loss/{k}": v for k, v in parts.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state.step)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=state.rng)
        return new_state, metrics

    return step


def mean_gradients(grad_fn: Callable[..., Any], params: Params, batch: TrainBatch, key: jax.Array,
                   grad_accum: int) -> tuple[Params, dict[str, jax.Array]]:
    """Gradients and loss parts averaged over `grad_accum` microbatches of `batch` (one pass when 1); microbatch
    i draws its noise from `fold_in(key, i)`. `grad_fn` is `value_and_grad(loss, has_aux=True)`."""
    if grad_accum == 1:
        (_, parts), grads = grad_fn(params, batch, jax.random.fold_in(key, 0))
    else:
        grads, parts = _accumulated_grads(grad_fn, params, _split_microbatches(batch, grad_accum), key)
    scale = 1.0 / grad_accum
    return jax.tree.map(lambda g: g * scale, grads), {k: v * scale for k, v in parts.items()}


def _accumulated_grads(grad_fn: Callable[..., Any], params: Params, micro: TrainBatch,
                       key: jax.Array) -> tuple[Params, dict[str, jax.Array]]:
    """Sums of gradients and loss parts over the leading microbatch axis (scanned; key folded with the index)."""

    def accumulate(carry, inputs):
        index, mb = inputs
        (_, parts), grads = grad_fn(params, mb, jax.random.fold_in(key, index))
        return jax.tree.map(lambda a, b: a + b, carry, (grads, parts)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (_, parts_shape), grads_shape = jax.eval_shape(grad_fn, params, first, key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, parts_shape))
    (grads, parts), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(micro.gen.vision.shape[0]), micro))
    return grads, parts


# ------------------------------------------------------------------------------------------------ sharding


def state_shardings(
    abstract_state: TrainState, param_shardings: Any, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Shardings for a whole TrainState: params/EMA and every parameter-shaped optimizer leaf follow
    `param_shardings` (from `cosmos_jax.sharding.param_shardings`: each parameter's logical axes from its key-table
    row, mapped by the mesh preset's rules); scalars (step, counts, rng) are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {_dict_keys(path): s for path, s in jax.tree_util.tree_leaves_with_path(param_shardings)}

    def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys = _dict_keys(path)
        for start in range(len(keys)):
            if keys[start:] in by_path and len(leaf.shape) > 0:
                return by_path[keys[start:]]
        return replicated

    opt = jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state.opt_state)
    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt,
        ema=None if abstract_state.ema is None else param_shardings,
        rng=replicated,
    )


def _dict_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def batch_shardings(abstract_batch: TrainBatch, mesh: Mesh, axes: tuple[str, ...] = ("data", "fsdp")) -> Any:
    """The batch split over its leading axis on the mesh's data-parallel axes (those present in the mesh)."""
    present = tuple(a for a in axes if a in mesh.axis_names)
    return jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(present or None)), abstract_batch)


def jit_train_step(
    step: Callable[[TrainState, TrainBatch], tuple[TrainState, dict[str, jax.Array]]],
    state_sharding: TrainState,
    batch_sharding: Any,
    mesh: Mesh,
) -> Callable[[TrainState, TrainBatch], tuple[TrainState, dict[str, jax.Array]]]:
    """jit with explicit in/out shardings, the state donated; metrics come back replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )


def abstract_state(model: Cosmos3Transformer, config: OptimConfig) -> tuple[TrainState, optax.GradientTransformation]:
    """The state's shapes (nothing allocated) and the optimizer built for the model's parameter tree."""
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), model.abstract_params())
    optimizer = make_optimizer(config, abstract_params)
    init = functools.partial(init_state, optimizer=optimizer, config=config, seed=0)
    return jax.eval_shape(init, abstract_params), optimizer

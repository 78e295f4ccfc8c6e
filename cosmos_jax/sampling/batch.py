"""Batches of samples: the noise rule, the shape a batch shares, grouping samples into batches, the rows of a
batch, and the batched denoising loop (one jitted `jax.lax.scan` for every sample of the batch).

The noise rule. Sample `k` of a request with seed `s` draws its starting noise from
    key = jax.random.fold_in(jax.random.key(s), k);  key_vision, key_sound, key_action = jax.random.split(key, 3)
each drawn with that sample's own shape (vision [1, C, T, h, w], sound [S, Ts], action [chunk, A]). So a sample's
noise, and with it its outputs, do not depend on the batch it runs in, its position there or the mesh.

A batch is a list of samples sharing one `BatchShape` (mode, latent frames and size, sound length, action chunk,
steps, whether guidance runs). Rows are sample-major: sample i owns rows `i*b .. i*b + b - 1`, with b = 2
(conditional, unconditional) under guidance and 1 without, so both guidance branches of a sample land on the same
device when the batch is sharded. Every row's prompt is one of the batch's *distinct* prompts (token sequences):
the reasoner tower runs once per distinct prompt, right-padded and masked, and each row reads its prompt's K/V.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.inputs import GeneratorInputs, ReasonerCache, TextInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence
from cosmos_jax.sampling import scheduler
from cosmos_jax.sampling.prepared import PreparedRequest
from cosmos_jax.sampling.request import TEMPORAL_COMPRESSION, GenerationRequest

_MAX_INDEX = 2**32 - 1
# Logical axes of the per-row reasoner K/V [layers, rows, Lu, kv_heads, head_dim] (cosmos_jax.sharding).
_CACHE_AXES = (None, "batch", "seq", "kv_heads", None)


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """Sample `index` of `request`: its noise comes from `sample_key(request.seed, index)`."""

    request: GenerationRequest
    index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or isinstance(self.index, bool) or not 0 <= self.index <= _MAX_INDEX:
            raise ValueError(f"sample index must be an int in [0, 2**32), got {self.index!r}")

    @property
    def seed(self) -> int:
        return self.request.seed


def sample_key(seed: int, index: int) -> jax.Array:
    """The key of sample `index` of a request with `seed`: fold_in(key(seed), index)."""
    return jax.random.fold_in(jax.random.key(seed), index)


def sample_noise(
    key: jax.Array, vision_shape: tuple[int, ...], sound_shape: tuple[int, ...] | None,
    action_shape: tuple[int, ...] | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Standard normal float32 noise (vision, sound | None, action | None) from one sample's key."""
    key_v, key_s, key_a = jax.random.split(key, 3)
    draw = lambda k, shape: np.asarray(jax.random.normal(k, shape, jnp.float32))  # noqa: E731
    return (draw(key_v, vision_shape), None if sound_shape is None else draw(key_s, sound_shape),
            None if action_shape is None else draw(key_a, action_shape))


# ------------------------------------------------------------------------------------------------ shapes


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """What every sample of one batch shares (the compiled loop's static shape)."""

    mode: str
    latent_shape: tuple[int, int, int]
    sound_len: int
    action_len: int
    steps: int
    use_cfg: bool

    @classmethod
    def of(cls, prep: PreparedRequest, steps: int) -> BatchShape:
        return cls(prep.mode, tuple(prep.latent_shape), prep.sound_len, prep.action_len, steps, prep.use_cfg)

    @property
    def branches(self) -> int:
        """Rows per sample: 2 under classifier-free guidance, else 1."""
        return 2 if self.use_cfg else 1

    @property
    def steps_action(self) -> bool:
        """Whether the action rows are denoised (not in forward dynamics, where every row is given)."""
        return self.action_len > 0 and self.mode != "forward_dynamics"

    def describe(self) -> str:
        t, h, w = self.latent_shape
        return (f"{self.mode}, latent {t}x{h}x{w}, sound {self.sound_len}, action chunk {self.action_len}, "
                f"{self.steps} steps, guidance {'on' if self.use_cfg else 'off'}")


_SHAPE_FIELDS = {"mode": "mode", "latent_shape": "latent frames/size", "sound_len": "sound length",
                 "action_len": "action chunk", "steps": "steps", "use_cfg": "guidance on/off"}


def common_shape(shapes: Sequence[BatchShape]) -> BatchShape:
    """The one shape of a batch; a ValueError naming the first sample and field that differ otherwise."""
    if not shapes:
        raise ValueError("a batch needs at least one sample")
    first = shapes[0]
    for i, shape in enumerate(shapes[1:], start=1):
        for name, label in _SHAPE_FIELDS.items():
            a, b = getattr(first, name), getattr(shape, name)
            if a != b:
                raise ValueError(f"samples of one batch must share a shape: sample {i} differs from sample 0 in "
                                 f"{label} ({b!r} vs {a!r}); group them with group_batches")
    return first


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedBatch:
    """Samples of one shape with their preps (one per sample, shared by the samples of a request)."""

    samples: tuple[Sample, ...]
    preps: tuple[PreparedRequest, ...]
    shape: BatchShape


def check_batch_size(batch_size: int, data: int = 1) -> None:
    """A batch size must be a positive int and a multiple of the `data` mesh axis (every device gets whole
    samples, and the padded last batch is never larger than `batch_size`)."""
    if not isinstance(data, int) or isinstance(data, bool) or data < 1:
        raise ValueError(f"the data axis size must be a positive int, got {data!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be a positive int, got {batch_size!r}")
    if batch_size % data:
        raise ValueError(f"batch size {batch_size} does not divide over the data axis of size {data}: "
                         f"use a multiple of {data}")


def padded_size(count: int, data: int) -> int:
    """`count` samples rounded up to a multiple of the data axis."""
    return -(-count // data) * data


def group_batches(shapes: Sequence[BatchShape], batch_size: int, data: int = 1) -> list[tuple[int, ...]]:
    """Group sample positions into batches: same-shape samples in order of first appearance, at most
    `batch_size` per batch (only a shape's last batch is short; it is padded to a multiple of `data` when run)."""
    check_batch_size(batch_size, data)
    groups: dict[BatchShape, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    return [tuple(members[i : i + batch_size]) for members in groups.values()
            for i in range(0, len(members), batch_size)]


# -------------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class BatchRows:
    """The host-side inputs of one batch of N samples (R = N * branches rows, U distinct prompts).

    text: TextInputs [U, Lu] of the distinct prompts (right-padded); static: per row "row_prompt" [R] int32
    (index into text), "position_ids" [R, 3, Lg], "vision_noisy" [R, T], "sound_noisy" [R, Ts], "action_noisy"
    [R, chunk], "action_domain" [R]; per sample "guidance" [N] float32 and "action_channels" [N, 1, A] bool.
    """

    text: TextInputs
    static: dict[str, np.ndarray]

    @property
    def distinct_prompts(self) -> int:
        return int(self.text.und_len.shape[0])


def batch_rows(
    config: Cosmos3Config, preps: Sequence[PreparedRequest], guidance: Sequence[float], pad_id: int
) -> BatchRows:
    """Lay out the rows of a batch of preps sharing one shape; identical prompts are encoded once."""
    shape = common_shape([BatchShape.of(p, 1) for p in preps])
    distinct: dict[tuple[int, ...], int] = {}
    row_ids, layouts = [], []
    for prep in preps:
        for ids in ([prep.cond_ids, prep.uncond_ids] if shape.use_cfg else [prep.cond_ids]):
            row_ids.append(distinct.setdefault(tuple(ids), len(distinct)))
            layouts.append(layout_sequence(
                config, len(ids), prep.latent_shape, fps=prep.fps, clean_vision_frames=prep.clean_frames,
                sound_len=prep.sound_len, action_len=prep.action_len, clean_action_rows=prep.clean_action_rows,
                vae_temporal_compression=TEMPORAL_COMPRESSION,
            ))
    first_row = {u: row_ids.index(u) for u in range(len(distinct))}
    prompts = [list(ids) for ids in distinct]
    text = batch_text(prompts, [layouts[first_row[u]] for u in range(len(prompts))], pad_id=pad_id)
    rows = len(layouts)
    static: dict[str, np.ndarray] = {
        "row_prompt": np.asarray(row_ids, np.int32),
        "position_ids": batch_generator_positions(layouts),
        "vision_noisy": np.stack([lay.vision_noisy for lay in layouts]),
        "guidance": np.asarray(guidance, np.float32),
    }
    if shape.sound_len:
        static["sound_noisy"] = np.ones((rows, shape.sound_len), bool)
    if shape.action_len:
        static["action_noisy"] = np.stack([lay.action_noisy for lay in layouts])
        static["action_domain"] = np.repeat(np.asarray([p.domain_id for p in preps], np.int32), shape.branches)
        static["action_channels"] = np.stack(
            [np.arange(config.action_dim) < p.raw_action_dim for p in preps])[:, None, :]
    return BatchRows(text, static)


# -------------------------------------------------------------------------------------------------- loop


def step_models(
    model: Cosmos3Transformer, step_w8a8: Sequence[frozenset[str]] | None
) -> tuple[tuple[Cosmos3Transformer, ...], np.ndarray | None]:
    """The model variants a loop runs and which one each step runs.

    step_w8a8: per step, the FP8 linear groups that run W8A8 (`modelopt_fp8.step_w8a8_groups`), or None (no FP8
    revision). Returns one `model` with `w8a8` set per distinct group set, in order of first use, and the variant
    index of every step [steps] int32 (None when there is only one variant)."""
    if step_w8a8 is None:
        return (model,), None
    distinct = list(dict.fromkeys(frozenset(g) for g in step_w8a8))
    models = tuple(dataclasses.replace(model, w8a8=g) for g in distinct)
    if len(models) == 1:
        return models, None
    return models, np.asarray([distinct.index(frozenset(g)) for g in step_w8a8], np.int32)


def batch_denoiser(
    model: Cosmos3Transformer, shape: BatchShape, cache_reasoner: bool, tick: Callable[[Any], None] | None,
    given_cache: bool = False, step_w8a8: Sequence[frozenset[str]] | None = None,
) -> Callable:
    """The sampling loop of one batch as a pure function
        (params, text [U], static, latents {"vision" [N, C, T, h, w], "sound" [N, S, Ts], "action" [N, chunk, A]},
         coefficients, timesteps [steps][, distinct]) -> final latents (same tree):
    the reasoner K/V of the distinct prompts once, gathered to the rows, then a scan of generator steps (with
    `cache_reasoner=False`, the joint forward of both towers at every step). With `given_cache`, `distinct` is a
    last argument computed beforehand: the distinct prompts' `ReasonerCache` [layers, U, Lu, ...] under each model
    variant of `step_models` (a tuple), and `params` need only the generator tree (the reasoner tower stays off the
    device during the loop).

    step_w8a8 (FP8 revision): per step, the linear groups that run W8A8. When the steps differ (the step policy's
    W8A16 first/last steps around W8A8 ones), each step picks its variant with `jax.lax.switch`, and the reasoner
    K/V is computed once per variant (the reasoner tower's linears belong to both groups, so its K/V differ).

    `tick(step)` is called on the host after every step through `jax.debug.callback`; with `tick=None` the loop
    has no host callback (JAX writes only such programs to the persistent compile cache)."""
    if given_cache and not cache_reasoner:
        raise ValueError("given_cache needs cache_reasoner (the loop reads a precomputed K/V cache)")
    branches, use_cfg = shape.branches, shape.use_cfg
    models, step_variant = step_models(model, step_w8a8)

    def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        return x if model.sharding is None else model.sharding.constrain(x, names)

    def run(params, text, static, latents, coefficients, timesteps, distinct=None):
        row_prompt = static["row_prompt"]
        rows = row_prompt.shape[0]
        samples = rows // branches
        if cache_reasoner:
            if not given_cache:
                distinct = tuple(m.encode_reasoner(params, text)[0] for m in models)
            caches = tuple(ReasonerCache(
                k=constrain(jnp.take(d.k, row_prompt, axis=1), _CACHE_AXES),
                v=constrain(jnp.take(d.v, row_prompt, axis=1), _CACHE_AXES),
                und_len=jnp.take(d.und_len, row_prompt),
            ) for d in distinct)
            steps = [lambda gen, m=m, c=c: m.denoise_step(params, c, gen) for m, c in zip(models, caches)]
        else:
            row_text = jax.tree.map(lambda x: jnp.take(x, row_prompt, axis=0), text)
            steps = [lambda gen, m=m: m(params, row_text, gen) for m in models]

        def denoise(i: jax.Array, gen: GeneratorInputs):
            if step_variant is None:
                return steps[0](gen)
            return jax.lax.switch(jnp.asarray(step_variant)[i], steps, gen)

        def per_row(x: jax.Array) -> jax.Array:
            return jnp.repeat(x, branches, axis=0).astype(model.dtype)

        def combine(v: jax.Array) -> jax.Array:
            v = v.astype(jnp.float32).reshape(samples, branches, *v.shape[1:])
            if not use_cfg:
                return v[:, 0]
            g = static["guidance"].reshape(samples, *(1,) * (v.ndim - 2))
            return v[:, 1] + g * (v[:, 0] - v[:, 1])

        def body(carry, i):
            x, states = carry
            t = jnp.full((rows,), timesteps[i], jnp.float32)
            gen = GeneratorInputs(
                position_ids=static["position_ids"],
                vision=per_row(x["vision"]), vision_noisy=static["vision_noisy"], vision_t=t,
                sound=per_row(x["sound"]) if "sound" in x else None,
                sound_noisy=static.get("sound_noisy"), sound_t=t if "sound" in x else None,
                action=per_row(x["action"]) if "action" in x else None,
                action_noisy=static.get("action_noisy"), action_t=t if "action" in x else None,
                action_domain=static.get("action_domain"),
            )
            out = denoise(i, gen)
            new_x, new_states = dict(x), dict(states)
            new_x["vision"], new_states["vision"] = scheduler.step(
                coefficients, states["vision"], combine(out.vision), x["vision"])
            if "sound" in x:
                new_x["sound"], new_states["sound"] = scheduler.step(
                    coefficients, states["sound"], combine(out.sound), x["sound"])
            if "action" in x and shape.steps_action:
                channels = static["action_channels"]
                velocity = jnp.where(channels, combine(out.action), 0.0)
                stepped, new_states["action"] = scheduler.step(coefficients, states["action"], velocity, x["action"])
                new_x["action"] = jnp.where(channels, stepped, 0.0)
            if tick is not None:
                jax.debug.callback(tick, i)
            return (new_x, new_states), None

        states = {name: scheduler.init_state(x.shape) for name, x in latents.items()}
        (final, _), _ = jax.lax.scan(body, (latents, states), jnp.arange(timesteps.shape[0]))
        return final

    return run


def owned_rows(x: jax.Array) -> dict[int, np.ndarray]:
    """The leading-axis rows of `x` this process owns: those of its addressable shards with replica id 0 (so
    across processes every row is owned exactly once). {row index: row as numpy}."""
    owned: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        start = (shard.index[0].start or 0) if shard.index else 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0]):
            owned[start + i] = data[i]
    return owned

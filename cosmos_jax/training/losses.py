"""The training objective (spec Appendix A): rectified-flow velocity loss per modality, σ sampling, text CE.

Rectified flow: x_σ = σ·ε + (1−σ)·x0 and the network predicts v = ε − x0 from x_σ and the timestep σ·1000.
Each modality's loss is the mean over *all* its elements of (pred − v)²·(1 − condition_mask): conditioning
(clean) frames/rows contribute zero but stay in the denominator. The action loss only covers the raw action
width of each sample (the model's action_dim may be wider; padded columns are ignored). Sound and action share
the vision σ of their sample.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from cosmos_jax.modeling.inputs import GeneratorInputs, GeneratorOutputs, TextInputs
from cosmos_jax.modeling.towers import ReasonerIO
from cosmos_jax.modeling.transformer import Cosmos3Transformer

TIMESTEP_SCALE = 1000.0  # the network is fed σ·1000 (it multiplies by timestep_scale = 0.001 internally)
RESOLUTION_SHIFT = {256: 3.0, 480: 5.0, 720: 10.0}
WAVER_COEFFICIENT = 1.29
SCHEDULES = ("waver", "logitnormal")


@flax.struct.dataclass
class TrainBatch:
    """One packed training batch (fixed shapes).

    text: the caption tokens; gen: *clean* latents x0 (vision [B, C, T, H, W], optional sound [B, S, Ts] and
    action [B, chunk, A]) with their noisy masks (False = conditioning frame/row); gen's *_t fields are ignored
    (σ is drawn per step). action_width [B] int32: raw action width per sample (<= A); text_loss_mask [B, Lu]
    float32: 1 where the next-token loss applies to the token *predicted at* that position.
    """

    text: TextInputs
    gen: GeneratorInputs
    action_width: jax.Array | None = None
    text_loss_mask: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (released midtrain yamls: vision 10, action 10, sound 2), σ schedule and shift."""

    vision_weight: float = 10.0
    action_weight: float = 10.0
    sound_weight: float = 2.0
    text_weight: float = 0.0
    schedule: str = "waver"
    shift: float = 3.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown σ schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if not self.shift > 0:
            raise ValueError(f"the σ shift must be positive, got {self.shift}")


def shift_for_resolution(resolution: int) -> float:
    """The per-resolution σ shift {256: 3, 480: 5, 720: 10}."""
    if resolution not in RESOLUTION_SHIFT:
        raise ValueError(f"no σ shift for resolution {resolution}; known: {sorted(RESOLUTION_SHIFT)}")
    return RESOLUTION_SHIFT[resolution]


def waver_t(u: jax.Array) -> jax.Array:
    """The video 'waver' distribution: t = 1 − u − 1.29·(cos²(πu/2) − 1 + u), u in [0, 1]."""
    return 1.0 - u - WAVER_COEFFICIENT * (jnp.cos(math.pi * u / 2) ** 2 - 1.0 + u)


def shift_sigma(t: jax.Array, shift: float) -> jax.Array:
    """σ = s·t / (1 + (s − 1)·t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_sigma(key: jax.Array, batch: int, schedule: str, shift: float) -> jax.Array:
    """[batch] float32 σ in [0, 1]: 'waver' (video) or 'logitnormal' (sigmoid of N(0, 1)), then shifted."""
    if schedule == "waver":
        t = waver_t(jax.random.uniform(key, (batch,), jnp.float32))
    elif schedule == "logitnormal":
        t = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    else:
        raise ValueError(f"unknown σ schedule {schedule!r}; choose one of {SCHEDULES}")
    return jnp.clip(shift_sigma(t, shift), 0.0, 1.0)


@flax.struct.dataclass
class Noise:
    """ε per modality, shaped like the batch's clean latents (sound/action None when absent)."""

    vision: jax.Array
    sound: jax.Array | None = None
    action: jax.Array | None = None


def sample_noise(key: jax.Array, gen: GeneratorInputs) -> Noise:
    """Standard normal ε (float32) for every modality present in `gen`."""
    kv, ks, ka = jax.random.split(key, 3)
    normal = lambda k, x: None if x is None else jax.random.normal(k, x.shape, jnp.float32)  # noqa: E731
    return Noise(vision=normal(kv, gen.vision), sound=normal(ks, gen.sound), action=normal(ka, gen.action))


def _noised(x0: jax.Array, eps: jax.Array, sigma: jax.Array, noisy: jax.Array) -> jax.Array:
    """x_σ where `noisy` (broadcast mask), x0 elsewhere; sigma [B] broadcast over x0's trailing axes."""
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    x0 = x0.astype(jnp.float32)
    return jnp.where(noisy, s * eps + (1.0 - s) * x0, x0)


def _vision_mask(gen: GeneratorInputs) -> jax.Array:
    return gen.vision_noisy[:, None, :, None, None]


def _sound_mask(gen: GeneratorInputs) -> jax.Array:
    return gen.sound_noisy[:, None, :]


def _action_mask(gen: GeneratorInputs, action_width: jax.Array | None) -> jax.Array:
    mask = gen.action_noisy[..., None]
    if action_width is None:
        return mask
    columns = jnp.arange(gen.action.shape[-1])
    return mask & (columns[None, None, :] < action_width[:, None, None])


def noisy_inputs(gen: GeneratorInputs, sigma: jax.Array, noise: Noise) -> GeneratorInputs:
    """The network's inputs: x_σ on noisy frames/rows, x0 on conditioning ones, timestep σ·1000 everywhere."""
    t = sigma.astype(jnp.float32) * TIMESTEP_SCALE
    updates: dict[str, Any] = dict(vision=_noised(gen.vision, noise.vision, sigma, _vision_mask(gen)), vision_t=t)
    if gen.sound is not None:
        updates.update(sound=_noised(gen.sound, noise.sound, sigma, _sound_mask(gen)), sound_t=t)
    if gen.action is not None:
        updates.update(action=_noised(gen.action, noise.action, sigma, gen.action_noisy[..., None]), action_t=t)
    return gen.replace(**updates)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array, denominator: jax.Array | int) -> jax.Array:
    """sum((pred − target)²·mask) / denominator, in float32."""
    err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    return jnp.sum(jnp.where(mask, err, 0.0)) / denominator


def velocity_losses(
    pred: GeneratorOutputs, gen: GeneratorInputs, noise: Noise, action_width: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-modality flow losses {'vision', 'sound'?, 'action'?}: mean of (pred − (ε − x0))² over all elements,
    conditioning frames counted as zero; the action denominator is chunk × raw width per sample."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    losses = {"vision": masked_mse(pred.vision, noise.vision - f32(gen.vision), _vision_mask(gen), gen.vision.size)}
    if gen.sound is not None:
        losses["sound"] = masked_mse(pred.sound, noise.sound - f32(gen.sound), _sound_mask(gen), gen.sound.size)
    if gen.action is not None:
        chunk = gen.action.shape[1]
        denominator = gen.action.size if action_width is None else chunk * jnp.sum(action_width)
        losses["action"] = masked_mse(
            pred.action, noise.action - f32(gen.action), _action_mask(gen, action_width), denominator
        )
    return losses


def text_cross_entropy(logits: jax.Array, text: TextInputs, loss_mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy: logits [B, Lu, V] at position i predict input_ids[:, i+1]; positions past
    und_len − 1 (and where loss_mask is 0) are excluded."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = text.input_ids[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    positions = jnp.arange(targets.shape[1])[None, :]
    mask = (positions < (text.und_len[:, None] - 1)).astype(jnp.float32)
    if loss_mask is not None:
        mask = mask * loss_mask[:, :-1].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def flow_loss(
    model: Cosmos3Transformer,
    params: Any,
    batch: TrainBatch,
    sigma: jax.Array,
    noise: Noise,
    config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted training loss for given σ [B] and ε, and its parts {'vision', 'sound', 'action', 'text'}."""
    gen_in = noisy_inputs(batch.gen, sigma, noise)
    pred, und_hidden = model.joint(params, batch.text, gen_in)
    parts = velocity_losses(pred, batch.gen, noise, batch.action_width)
    weights = {"vision": config.vision_weight, "sound": config.sound_weight, "action": config.action_weight}
    total = sum(weights[k] * v for k, v in parts.items())
    if config.text_weight:
        io_params = {k: v for k, v in params["reasoner"].items() if k != "layers"}
        logits = model.reasoner_io.apply({"params": io_params}, und_hidden, method=ReasonerIO.logits)
        parts["text"] = text_cross_entropy(logits, batch.text, batch.text_loss_mask)
        total = total + config.text_weight * parts["text"]
    parts["total"] = total
    return total, parts


def random_flow_loss(
    model: Cosmos3Transformer, params: Any, batch: TrainBatch, key: jax.Array, config: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """flow_loss with σ drawn from the configured schedule and ε ~ N(0, 1), both from `key`."""
    k_sigma, k_noise = jax.random.split(key)
    sigma = sample_sigma(k_sigma, batch.gen.vision.shape[0], config.schedule, config.shift)
    return flow_loss(model, params, batch, sigma, sample_noise(k_noise, batch.gen), config)

"""The pushed-disc world (tools/synthetic_world.py): its physics and latent fold, the Euler sampler's σ/velocity/
timestep convention against the training loss's, and (slow) a short training run that beats the baselines."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.inputs import GeneratorOutputs
from cosmos_jax.training import data as data_lib
from cosmos_jax.training.losses import TIMESTEP_SCALE, noisy_inputs, sample_noise

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "synthetic_world.py")
_SPEC = importlib.util.spec_from_file_location("synthetic_world", _PATH)
world = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = world  # dataclasses resolve their module by name
_SPEC.loader.exec_module(world)

SAMPLER_TOL = 2e-5  # fp32: Euler with the exact velocity field lands on x0
CENTROID_TOL = 0.1  # px: the intensity centroid of a pixelised radius-2.5 disc sits within ~0.05 px of its centre


def _centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) intensity centroid of a [SIZE, SIZE, C] frame, in pixel coordinates (pixel centres at +0.5)."""
    weight = frame.sum(axis=-1)
    yy, xx = np.mgrid[0 : world.SIZE, 0 : world.SIZE] + 0.5
    return np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()


def test_latent_fold_round_trips_and_spans_minus_one_to_one():
    frames, _ = world.rollout(np.random.default_rng(3))
    latents = world.to_latents(frames)
    assert latents.shape == (world.LATENT_CHANNELS, world.FRAMES, world.SIZE // world.PATCH, world.SIZE // world.PATCH)
    assert latents.min() == -1.0 and 0.0 < latents.max() <= 1.0
    np.testing.assert_allclose(world.from_latents(latents), frames, atol=1e-6)


def test_push_moves_the_disc_by_push_times_action_until_a_wall():
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(50):
        frames, pushes = world.rollout(rng)
        centroids = np.stack([_centroid(f) for f in frames])
        for step, push in enumerate(pushes):
            position = centroids[step]
            target = position + world.PUSH * push
            if np.all((target > world.RADIUS + 0.5) & (target < world.SIZE - world.RADIUS - 0.5)):
                np.testing.assert_allclose(centroids[step + 1] - position, world.PUSH * push, atol=CENTROID_TOL)
                moved += 1
    assert moved > 100  # most pushes are away from the walls


def _tiny_forward_batch(clips: int = 3):
    cfg = Cosmos3Config(**world.MODEL)
    meta = data_lib.DatasetMeta((world.LATENT_CHANNELS, world.FRAMES, 8, 8), 8.0, world.FRAMES - 1, 2)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(clips):
        frames, pushes = world.rollout(rng)
        sample = {"id": str(i), "latents": world.to_latents(frames), "caption_ids": world.CAPTION,
                  "actions": pushes, "domain": np.int32(1)}
        rows.append(data_lib.pack_sample(sample, meta, cfg, world.TEXT_LEN, "forward" if i % 2 else "inverse"))
    return data_lib.to_train_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})


def _oracle(x0_vision: jax.Array, x0_action: jax.Array):
    """A 'model' that returns the exact flow velocity (x_σ − x0)/σ, reading σ from the timestep as the network
    does (σ = t / TIMESTEP_SCALE) and zero on clean frames/rows like the real output heads."""

    def model(params, text, gen):
        sigma = gen.vision_t[:, None, None, None, None] / TIMESTEP_SCALE
        vision = jnp.where(gen.vision_noisy[:, None, :, None, None], (gen.vision - x0_vision) / sigma, 0.0)
        a_sigma = gen.action_t[:, None, None] / TIMESTEP_SCALE
        action = jnp.where(gen.action_noisy[..., None], (gen.action - x0_action) / a_sigma, 0.0)
        return GeneratorOutputs(vision=vision, action=action)

    return model


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (10, 1.0), (10, 3.0)])
def test_euler_sampler_with_the_exact_velocity_returns_x0(steps, shift):
    batch = _tiny_forward_batch()
    gen = batch.gen
    x0_v, x0_a = jnp.asarray(gen.vision), jnp.asarray(gen.action)
    vision, action = world.euler_sample(_oracle(x0_v, x0_a), None, batch.text, gen, jax.random.key(0), steps, shift)
    np.testing.assert_allclose(vision, x0_v, atol=SAMPLER_TOL)
    np.testing.assert_allclose(action, x0_a, atol=SAMPLER_TOL)


def test_training_target_is_the_oracle_velocity():
    """What the loss trains towards, ε − x0 at x_σ = noisy_inputs(...), is the velocity the sampler integrates."""
    batch = _tiny_forward_batch()
    gen = batch.gen
    noise = sample_noise(jax.random.key(2), gen)
    sigma = jnp.array([0.9, 0.5, 0.2])
    noisy = noisy_inputs(gen, sigma, noise)
    out = _oracle(jnp.asarray(gen.vision), jnp.asarray(gen.action))(None, batch.text, noisy)
    v_mask = np.asarray(gen.vision_noisy)[:, None, :, None, None]
    target = np.where(v_mask, np.asarray(noise.vision) - np.asarray(gen.vision), 0.0)
    np.testing.assert_allclose(out.vision, target, atol=1e-5)
    a_mask = np.asarray(gen.action_noisy)[..., None]
    np.testing.assert_allclose(out.action, np.where(a_mask, noise.action - gen.action, 0.0), atol=1e-5)


def test_euler_sampler_rejects_zero_steps():
    batch = _tiny_forward_batch(1)
    with pytest.raises(ValueError, match="steps >= 1"):
        world.euler_sample(_oracle(batch.gen.vision, batch.gen.action), None, batch.text, batch.gen,
                           jax.random.key(0), 0, 1.0)

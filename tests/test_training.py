"""Training: flow loss and gradients vs a direct torch computation on the diffusers transformer (fp32), σ
schedules, kill-and-resume bitwise, sharded vs single-device step, bad data reported by sample id."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cosmos_jax.convert.keymap_transformer import params_from_torch_state
from cosmos_jax.modeling.inputs import GeneratorInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence
from cosmos_jax.training import losses
from cosmos_jax.training.losses import LossConfig, Noise, TrainBatch
from torch_reference import NANO_STYLE, build_torch_transformer, jax_config, reference_segments, save_and_read_state

LOSS_REL_TOL = 1e-5  # fp32 loss, JAX vs torch
GRAD_REL_TOL = 1e-4  # fp32 gradients: max |Δ| / max |g| per parameter


def _torch_loss(model, segments, input_ids, x_sigma, sound_sigma, action_sigma, timestep, domain, targets, masks,
                raw_width):
    """The reference objective computed directly in torch: 10·L_vision + 2·L_sound + 10·L_action."""
    n_vision = len(segments["vision_mse_loss_indexes"])
    as_t = lambda x: torch.as_tensor(np.array(x, np.float32))  # noqa: E731
    vision, sound, action = model(
        input_ids=torch.as_tensor(input_ids, dtype=torch.long), text_indexes=segments["text_indexes"],
        position_ids=segments["position_ids"], und_len=segments["und_len"], sequence_length=segments["sequence_length"],
        vision_tokens=[as_t(x_sigma)], vision_token_shapes=segments["vision_token_shapes"],
        vision_sequence_indexes=segments["vision_sequence_indexes"],
        vision_mse_loss_indexes=segments["vision_mse_loss_indexes"],
        vision_timesteps=torch.full((n_vision,), timestep), vision_noisy_frame_indexes=segments["vision_noisy_frame_indexes"],
        sound_tokens=[as_t(sound_sigma)], sound_token_shapes=segments["sound_token_shapes"],
        sound_sequence_indexes=segments["sound_sequence_indexes"], sound_mse_loss_indexes=segments["sound_mse_loss_indexes"],
        sound_timesteps=torch.full((segments["sound_len"],), timestep),
        sound_noisy_frame_indexes=segments["sound_noisy_frame_indexes"],
        action_tokens=[as_t(action_sigma)], action_token_shapes=segments["action_token_shapes"],
        action_sequence_indexes=segments["action_sequence_indexes"],
        action_mse_loss_indexes=segments["action_mse_loss_indexes"],
        action_timesteps=torch.full((segments["num_noisy_action_tokens"],), timestep),
        action_noisy_frame_indexes=segments["action_noisy_frame_indexes"], action_domain_ids=[torch.tensor(domain)],
        return_dict=False,
    )
    v_t, s_t, a_t = (as_t(t) for t in targets)
    v_m, s_m, a_m = (as_t(m) for m in masks)
    l_vision = (((vision[0] - v_t[0]) ** 2) * v_m).sum() / v_t.numel()
    l_sound = (((sound[0] - s_t[0]) ** 2) * s_m).sum() / s_t.numel()
    a_err = ((action[0] - a_t[0]) ** 2 * a_m)[:, :raw_width]
    l_action = a_err.sum() / (a_t.shape[1] * raw_width)
    return 10 * l_vision + 2 * l_sound + 10 * l_action, (l_vision, l_sound, l_action)


def test_flow_loss_and_gradients_match_torch(tmp_path):
    torch_model = build_torch_transformer(NANO_STYLE, seed=3).float()
    state = save_and_read_state(torch_model, str(tmp_path))
    cfg = jax_config(torch_model)
    rng = np.random.default_rng(0)
    und_len, latent, fps, sound_len, chunk, domain, raw_width, sigma = 6, (3, 4, 4), 24.0, 3, 4, 2, 5, 0.63
    input_ids = rng.integers(0, cfg.vocab_size, und_len)
    x0 = rng.standard_normal((1, cfg.latent_channel, *latent)).astype(np.float32)
    s0 = rng.standard_normal((1, cfg.sound_dim, sound_len)).astype(np.float32)
    a0 = np.zeros((1, chunk, cfg.action_dim), np.float32)
    a0[..., :raw_width] = rng.standard_normal((1, chunk, raw_width))
    noise = Noise(*(rng.standard_normal(x.shape).astype(np.float32) for x in (x0, s0, a0)))
    layout = layout_sequence(cfg, und_len, latent, fps=fps, clean_vision_frames=[0], sound_len=sound_len,
                             action_len=chunk)
    gen = GeneratorInputs(
        position_ids=batch_generator_positions([layout]), vision=x0, vision_noisy=layout.vision_noisy[None],
        vision_t=np.zeros(1, np.float32), sound=s0, sound_noisy=np.ones((1, sound_len), bool),
        sound_t=np.zeros(1, np.float32), action=a0, action_noisy=layout.action_noisy[None],
        action_t=np.zeros(1, np.float32), action_domain=np.array([domain], np.int32))
    batch = TrainBatch(text=batch_text([input_ids], [layout]), gen=gen, action_width=np.array([raw_width], np.int32))
    batch = jax.tree.map(jnp.asarray, batch)
    noise = jax.tree.map(jnp.asarray, noise)

    jmodel = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla")
    params = jax.tree.map(jnp.asarray, params_from_torch_state(state, cfg, jmodel.abstract_params()))
    sigma_j = jnp.array([sigma], jnp.float32)

    def loss_fn(p):
        return losses.flow_loss(jmodel, p, batch, sigma_j, noise, LossConfig())

    (loss, parts), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    noised = losses.noisy_inputs(batch.gen, sigma_j, noise)

    segments = reference_segments(torch_model, und_len, latent, fps, [0], sound_len, chunk, [])
    v_mask = np.broadcast_to(layout.vision_noisy[None, None, :, None, None], x0.shape).astype(np.float32)
    targets = [np.asarray(n) - x for n, x in zip((noise.vision, noise.sound, noise.action), (x0, s0, a0))]
    masks = [v_mask[0], np.ones(s0.shape[1:], np.float32), np.ones(a0.shape[1:], np.float32)]
    t_loss, t_parts = _torch_loss(torch_model, segments, input_ids, np.asarray(noised.vision), np.asarray(noised.sound)[0],
                                  np.asarray(noised.action)[0], sigma * 1000.0, domain, targets, masks, raw_width)
    torch_model.zero_grad()
    t_loss.backward()

    assert t_loss.item() > 1.0
    for name, t_part in zip(("vision", "sound", "action"), t_parts):
        assert abs(float(parts[name]) - float(t_part)) <= LOSS_REL_TOL * float(t_part), name
    assert abs(float(loss) - t_loss.item()) <= LOSS_REL_TOL * t_loss.item()

    t_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters() if p.grad is not None}
    t_grads.update({name: np.zeros(p.shape, np.float32) for name, p in torch_model.named_parameters() if p.grad is None})
    want = params_from_torch_state(t_grads, cfg, jmodel.abstract_params())
    checked = 0
    for (path, got), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
        scale = float(np.abs(w).max())
        if scale == 0:
            assert float(np.abs(got).max()) < 1e-7, jax.tree_util.keystr(path)
            continue
        err = float(np.abs(np.asarray(got) - w).max()) / scale
        assert err <= GRAD_REL_TOL, f"{jax.tree_util.keystr(path)}: gradient relative error {err:.3g}"
        checked += 1
    assert checked > 20

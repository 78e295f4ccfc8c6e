"""Training: flow loss and gradients vs a direct torch computation on the diffusers transformer (fp32), σ
schedules, kill-and-resume bitwise, sharded vs single-device step, bad data reported by sample id."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cosmos_jax import sharding as sharding_lib
from cosmos_jax.convert.keymap_transformer import params_from_torch_state
from cosmos_jax.modeling.inputs import GeneratorInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence
from cosmos_jax.sharding import ActivationSharding, load_mesh_preset
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
        vision_timesteps=torch.full((n_vision,), timestep),
        vision_noisy_frame_indexes=segments["vision_noisy_frame_indexes"],
        sound_tokens=[as_t(sound_sigma)], sound_token_shapes=segments["sound_token_shapes"],
        sound_sequence_indexes=segments["sound_sequence_indexes"],
        sound_mse_loss_indexes=segments["sound_mse_loss_indexes"],
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
    t_loss, t_parts = _torch_loss(torch_model, segments, input_ids, np.asarray(noised.vision),
                                  np.asarray(noised.sound)[0],
                                  np.asarray(noised.action)[0], sigma * 1000.0, domain, targets, masks, raw_width)
    torch_model.zero_grad()
    t_loss.backward()

    assert t_loss.item() > 1.0
    for name, t_part in zip(("vision", "sound", "action"), t_parts):
        assert abs(float(parts[name]) - float(t_part)) <= LOSS_REL_TOL * float(t_part), name
    assert abs(float(loss) - t_loss.item()) <= LOSS_REL_TOL * t_loss.item()

    t_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters() if p.grad is not None}
    t_grads.update({name: np.zeros(p.shape, np.float32)
                    for name, p in torch_model.named_parameters() if p.grad is None})
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


# ------------------------------------------------------------------------------------------ σ schedules


def test_waver_and_shift_values():
    u = jnp.array([0.0, 0.25, 0.5, 1.0])
    # t = 1 − u − 1.29·(cos²(πu/2) − 1 + u); cos²(π/8) = 0.8535534
    np.testing.assert_allclose(losses.waver_t(u), [1.0, 0.75 - 1.29 * (0.8535534 - 0.75), 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(losses.shift_sigma(jnp.array([0.0, 0.5, 1.0]), 3.0), [0.0, 0.75, 1.0], atol=1e-7)
    assert [losses.shift_for_resolution(r) for r in (256, 480, 720)] == [3.0, 5.0, 10.0]
    with pytest.raises(ValueError, match="no σ shift for resolution 300"):
        losses.shift_for_resolution(300)
    sigma = losses.sample_sigma(jax.random.key(0), 4096, "logitnormal", 1.0)
    assert abs(float(jnp.median(sigma)) - 0.5) < 0.03  # sigmoid(N(0,1)) has median 0.5
    shifted = losses.sample_sigma(jax.random.key(0), 4096, "waver", 3.0)
    assert 0.0 <= float(shifted.min()) and float(shifted.max()) <= 1.0 and float(jnp.mean(shifted)) > 0.6


def test_text_cross_entropy_masks_padding():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    text = losses.TextInputs(input_ids=jnp.array([[0, 1, 2]]), und_len=jnp.array([2]),
                             position_ids=jnp.zeros((1, 3, 3)))
    # und_len 2: only position 0 predicts a real token (id 1, p = 0.25)
    np.testing.assert_allclose(losses.text_cross_entropy(logits, text), -np.log(0.25), rtol=1e-6)


# ------------------------------------------------------------------------------------------ data


def _write_world(root, count=6, extra=()):
    from cosmos_jax.training import data as data_lib

    rng = np.random.default_rng(0)
    meta = data_lib.DatasetMeta((48, 2, 4, 4), 8.0, 2, 3)
    entries = [data_lib.write_sample(str(root), f"s{i}", rng.standard_normal((48, 2, 4, 4)).astype(np.float32),
                                     rng.integers(1, 300, 2 + i % 3), rng.standard_normal((2, 3)), 1)
               for i in range(count)]
    for sid, kwargs in extra:
        entries.append(data_lib.write_sample(str(root), sid, **kwargs))
    data_lib.write_dataset(str(root), meta, entries)
    return meta


BAD = [
    ("wide_actions", dict(latents=np.zeros((48, 2, 4, 4), np.float32), caption_ids=[1, 2],
                          actions=np.zeros((2, 4)), domain=1)),
    ("no_caption", dict(latents=np.zeros((48, 2, 4, 4), np.float32), caption_ids=np.zeros(0, np.int32),
                        actions=np.zeros((2, 3)), domain=1)),
]


def test_bad_data_is_reported_with_the_sample_id(tmp_path):
    from cosmos_jax.training import data as data_lib

    _write_world(tmp_path, extra=BAD)
    (tmp_path / "samples" / "s2.npz").write_bytes(b"not a zip")  # corrupt clip
    cfg = jax_config(build_torch_transformer(NANO_STYLE))
    loader, _, bad_log = data_lib.make_loader(str(tmp_path), cfg, data_lib.PipelineConfig(2, 8, skip_bad=True))
    it = iter(loader)
    rows = [next(it) for _ in range(6)]
    assert all(r["vision"].shape == (2, 48, 2, 4, 4) and r["action"].shape == (2, 2, 16) for r in rows)
    reasons = dict(bad_log.skipped)
    assert set(reasons) == {"s2", "wide_actions", "no_caption"}
    assert "cannot read" in reasons["s2"] and "wrong action width" in reasons["wide_actions"]
    assert "missing or empty caption" in reasons["no_caption"]
    loader, _, _ = data_lib.make_loader(str(tmp_path), cfg, data_lib.PipelineConfig(2, 8, skip_bad=False))
    with pytest.raises(data_lib.BadSample, match="bad sample '(s2|wide_actions|no_caption)'"):
        it = iter(loader)
        for _ in range(12):
            next(it)


# ------------------------------------------------------------------------------------------ metrics


def test_event_file_round_trip(tmp_path):
    from cosmos_jax.training import metrics as metrics_lib

    assert metrics_lib.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    writer = metrics_lib.MetricsWriter(str(tmp_path))
    assert writer.push(1, {"loss/total": jnp.float32(2.5)}, 0.5, 100) == {}  # written one step late
    written = writer.push(2, {"loss/total": jnp.float32(1.25)}, 0.25, 100)
    assert written["loss/total"] == 2.5 and written["perf/tokens_per_s"] == 200.0
    writer.close()
    (events,) = [p for p in os.listdir(tmp_path) if p.startswith("events.out.tfevents")]
    read = metrics_lib.read_events(str(tmp_path / events))
    assert [(s, v["loss/total"]) for s, v in read] == [(1, 2.5), (2, 1.25)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------ train step


def _small_config():
    from cosmos_jax.config import Cosmos3Config

    return Cosmos3Config.from_dict(NANO_STYLE)


def _packed_batch(root, cfg, batch_size):
    from cosmos_jax.training import data as data_lib

    loader, _, _ = data_lib.make_loader(str(root), cfg, data_lib.PipelineConfig(batch_size, 8, seed=3))
    return data_lib.to_train_batch(next(iter(loader)))


# fp32: 8-way FSDP reorders reductions. Adam's first step is g/(|g|+eps), which turns reduction noise in near-zero
# gradients into O(lr) updates, so the test uses eps=1e-3; bound: max |Δparam| / max |update| (+ 2e-7·max |param|).
SHARDED_REL_TOL = 1e-3
TINY_RULES = load_mesh_preset("tiny").rules


def test_sharded_step_equals_single_device_step(tmp_path):
    """One train step on 1 device, 8-way FSDP, and FSDP 4 × context-parallel 2 (the generator attention split over
    the sequence, as `RunConfig(mesh='fsdp=4,context=2')` runs it): same losses, gradients and updates."""
    from cosmos_jax.training import step as step_lib

    _write_world(tmp_path, count=8)
    cfg = _small_config()
    model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla")
    optim = step_lib.OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, ema_decay=0.5, eps=1e-3)
    batch = _packed_batch(tmp_path, cfg, 8)
    abstract, optimizer = step_lib.abstract_state(model, optim)
    params = jax.device_get(model.init(jax.random.key(0)))  # host copies: the device states below are donated
    assert batch.gen.position_ids.shape[2] % 2 == 0  # the context=2 mesh really splits the generator sequence
    results = []
    for mesh_spec in ("fsdp=1", "fsdp=8", "fsdp=4,context=2"):
        mesh = sharding_lib.make_mesh(mesh_spec, jax.devices()[: 1 if mesh_spec == "fsdp=1" else 8])
        context = mesh.shape["context"] > 1
        mesh_model = dataclasses.replace(model, sharding=ActivationSharding(mesh, TINY_RULES)) if context else model
        param_shardings = sharding_lib.param_shardings(abstract.params, mesh, TINY_RULES)
        shardings = step_lib.state_shardings(abstract, param_shardings, optimizer, mesh)
        state = jax.device_put(step_lib.init_state(params, optimizer, optim, seed=7), shardings)
        fn = step_lib.jit_train_step(step_lib.train_step_fn(mesh_model, optimizer, LossConfig(), optim), shardings,
                                     step_lib.batch_shardings(batch, mesh), mesh)
        new_state, metrics = fn(state, batch)
        if mesh.size == 8:
            kernel = new_state.params["generator"]["layers"]["mlp"]["up_proj"]["kernel"]
            assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
        results.append(jax.device_get((new_state, metrics)))
    (single, m1), *others = results
    start = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    for sharded, m8 in others:
        for key in ("loss/total", "loss/vision", "loss/action", "grad_norm"):
            assert abs(m1[key] - m8[key]) <= 1e-5 * abs(m1[key]), key
        for name, a, b in zip(("params", "ema"), (single.params, single.ema), (sharded.params, sharded.ema)):
            for la, lb, l0 in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(start)):
                scale = max(float(np.abs(la - l0).max()), 1e-12)
                assert float(np.abs(la - lb).max()) <= SHARDED_REL_TOL * scale + 2e-7 * float(np.abs(l0).max()), name
    # the frozen reasoner is untouched; the generator moved
    for la, l0 in zip(jax.tree.leaves(single.params["reasoner"]), jax.tree.leaves(start["reasoner"])):
        np.testing.assert_array_equal(la, l0)
    moved = single.params["generator"]["proj_in"]["kernel"] - start["generator"]["proj_in"]["kernel"]
    assert float(np.abs(moved).max()) > 1e-4


RESUME_SCRIPT = """
import sys
import jax, numpy as np
from cosmos_jax.training.loop import RunConfig, train
from cosmos_jax.training.step import OptimConfig
config, data, out, fail_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def on_step(step, state):
    if step == fail_at:
        raise RuntimeError("injected failure after step %d" % step)
optim = OptimConfig(lr=1e-3, warmup_steps=1, total_steps=4, ema_decay=0.9, freeze_reasoner=False, grad_accum=2)
run = RunConfig(model=config, data=data, out=out, steps=4, batch=2, max_text_len=8, dtype="float32",
                attention="xla", mesh="fsdp=1", save_every=2, optim=optim)
result = train(run, on_step=on_step, progress=False)
state = result["state"]
np.savez(out + "/final.npz", *[np.asarray(x) for x in jax.tree.leaves((state.params, state.ema, state.opt_state))])
"""


def _run_resume_script(tmp_path, out, fail_at):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "model.json"), str(tmp_path / "data"),
                           str(out), str(fail_at)], env=env, capture_output=True, text=True, timeout=600)


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    (tmp_path / "data").mkdir()
    _write_world(tmp_path / "data", count=5)
    _small_config().to_json(tmp_path / "model.json")
    straight = _run_resume_script(tmp_path, tmp_path / "straight", -1)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run_resume_script(tmp_path, tmp_path / "killed", 3)
    assert killed.returncode != 0 and "injected failure after step 3" in killed.stderr
    assert not (tmp_path / "killed" / "final.npz").exists()
    assert (tmp_path / "killed" / "checkpoints" / "2").is_dir()
    resumed = _run_resume_script(tmp_path, tmp_path / "killed", -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with np.load(tmp_path / "straight" / "final.npz") as a, np.load(tmp_path / "killed" / "final.npz") as b:
        assert a.files == b.files and len(a.files) > 50
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    lines = (tmp_path / "killed" / "metrics" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps[-2:] == [3, 4]  # the resumed run trained steps 3 and 4


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    from cosmos_jax.training import step as step_lib
    from cosmos_jax.training.checkpoint import TrainCheckpointer, with_shardings

    model = Cosmos3Transformer(_small_config(), dtype=jnp.float32)
    optim = step_lib.OptimConfig(ema_decay=0.9)
    abstract, optimizer = step_lib.abstract_state(model, optim)
    params = jax.device_get(model.init(jax.random.key(1)))
    layouts = []
    for devices in (8, 2):
        mesh = sharding_lib.make_mesh(f"fsdp={devices}", jax.devices()[:devices])
        param_shardings = sharding_lib.param_shardings(abstract.params, mesh, TINY_RULES)
        layouts.append(step_lib.state_shardings(abstract, param_shardings, optimizer, mesh))
    state = jax.device_put(step_lib.init_state(params, optimizer, optim, seed=5), layouts[0])
    checkpointer = TrainCheckpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, state, {"data_iterator": f"position {step}"})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 3]  # keep-N
    restored, extra = checkpointer.restore(with_shardings(abstract, layouts[1]))
    checkpointer.close()
    assert extra == {"data_iterator": "position 3"}
    kernel = restored.params["generator"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 2
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(a, b)

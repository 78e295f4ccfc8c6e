"""LoRA (cosmos_jax/training/lora.py, convert/lora_peft.py): attach vs merge, save/reload, adapters-only training
with bitwise resume, the base fingerprint check, the PEFT export loaded by diffusers' own `load_lora_adapter` (peft)
and matched in fp32, and the CLI refusals."""

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

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.keymap_transformer import params_from_torch_state
from cosmos_jax.convert.lora_peft import peft_state
from cosmos_jax.convert.tree_paths import get_path
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.modeling.weights import LowRankUpdate
from cosmos_jax.training import lora
from test_modelopt_fp8 import CASES
from test_quantize import _inputs
from torch_reference import NANO_STYLE, build_torch_transformer, jax_config, reference_forward, reference_segments

TARGETS = lora.parse_targets("q_proj,v_proj,up_proj,reasoner/o_proj,proj_in,proj_out")
ACTION_TARGETS = lora.parse_targets("k_proj,action_proj_in,action_proj_out")


def _random_params(model, seed):
    """Random weights for every leaf of `model` (numpy; no compile of init)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), model.abstract_params())


def _random_adapters(params, rank=3, seed=0, targets=TARGETS):
    adapters = lora.init_adapters(params, lora.LoraConfig(rank, targets), jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 100))
    return jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


def test_parse_targets_and_refusals():
    assert lora.parse_targets("q_proj,reasoner/down_proj") == (
        ("generator", "layers", "q_proj", "kernel"), ("reasoner", "layers", "mlp", "down_proj", "kernel"))
    assert lora.parse_targets("action_proj_in,generator/proj_out") == (
        ("generator", "action_proj_in", "kernel"), ("generator", "proj_out", "kernel"))
    with pytest.raises(ValueError, match=r"--lora-targets 'qkv'"):
        lora.parse_targets("q_proj,qkv")
    with pytest.raises(ValueError, match=r"--lora-targets 'reasoner/proj_in'.*a generator projection: proj_in"):
        lora.parse_targets("reasoner/proj_in")
    with pytest.raises(ValueError, match="--lora-rank must be a positive integer, got 0"):
        lora.LoraConfig(0, TARGETS)
    assert lora.parse_lora_arg("a/b:0.5") == ("a/b", 0.5)
    with pytest.raises(ValueError, match="scale after ':' must be a number"):
        lora.parse_lora_arg("a/b:x")


@pytest.mark.slow  # two compiles of the Nano-style forward: ~60 s on the loaded 2-core machine
def test_attached_equals_merged_and_the_save_round_trip(tmp_path):
    cfg = Cosmos3Config.from_dict(NANO_STYLE)
    model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla")
    params = _random_params(model, 0)
    adapters = _random_adapters(params)
    config = lora.LoraConfig(3, TARGETS, alpha=6.0)
    folder = lora.save_adapters(tmp_path / "ad", adapters, config, lora.fingerprint(params))
    saved = lora.load_adapters(folder)
    assert saved.config == dataclasses.replace(config, targets=tuple(sorted(TARGETS)))
    assert saved.base_fingerprint == lora.fingerprint(params)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(saved.adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    action_config = lora.LoraConfig(2, ACTION_TARGETS)
    action_adapters = _random_adapters(params, rank=2, seed=7, targets=ACTION_TARGETS)
    assert action_adapters["generator"]["action_proj_in"]["kernel"]["a"].shape == (cfg.num_embodiment_domains,
                                                                                 cfg.action_dim, 2)
    second = lora.load_adapters(lora.save_adapters(tmp_path / "ad2", action_adapters, action_config,
                                                   lora.fingerprint(params)))
    text, gen = _inputs(cfg)
    rows, lg = 3, gen.position_ids.shape[-1] + 3
    gen = dataclasses.replace(
        gen, position_ids=jnp.broadcast_to(6 + jnp.arange(lg, dtype=jnp.float32), (1, 3, lg)),
        action=jax.random.normal(jax.random.key(9), (1, rows, cfg.action_dim), jnp.float32),
        action_noisy=jnp.ones((1, rows), bool), action_t=gen.vision_t, action_domain=jnp.array([1], jnp.int32))
    specs = [(saved, 0.5, "x"), (second, 1.0, "y")]
    attached = lora.apply_adapters(params, specs, merge_now=False)
    assert isinstance(attached["generator"]["layers"]["q_proj"]["kernel"], LowRankUpdate)
    assert isinstance(attached["generator"]["action_proj_in"]["kernel"], LowRankUpdate)
    assert isinstance(attached["generator"]["proj_in"]["kernel"], LowRankUpdate)
    merged = lora.apply_adapters(params, specs, merge_now=True)
    got_out = jax.jit(model.__call__)(attached, text, gen)
    want_out = jax.jit(model.__call__)(merged, text, gen)
    plain_out = jax.jit(model.__call__)(params, text, gen)
    for got, want, plain in ((got_out.vision, want_out.vision, plain_out.vision),
                             (got_out.action, want_out.action, plain_out.action)):
        scale = float(jnp.abs(want).max())
        assert float(jnp.abs(got - want).max()) <= 1e-6 * scale
        assert float(jnp.abs(want - plain).max()) > 1e-3 * scale  # the adapters do move the output
    # merged kernel = W + 0.5 * (6/3) * a @ b
    a, b = (adapters["generator"]["layers"]["q_proj"]["kernel"][k] for k in ("a", "b"))
    np.testing.assert_allclose(np.asarray(merged["generator"]["layers"]["q_proj"]["kernel"]),
                               np.asarray(params["generator"]["layers"]["q_proj"]["kernel"] + a @ b),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged["generator"]["action_proj_out"]["kernel"]),
                               np.asarray(params["generator"]["action_proj_out"]["kernel"] + jnp.einsum(
                                   "dir,dro->dio", *(action_adapters["generator"]["action_proj_out"]["kernel"][k]
                                                     for k in ("a", "b")))), rtol=0, atol=1e-6)
    other = _random_params(model, 1)
    with pytest.raises(ValueError, match=r"--lora x: trained on base weights"):
        lora.apply_adapters(other, [(saved, 1.0, "x")], merge_now=True)


def test_peft_export_loads_into_diffusers_and_matches(tmp_path):
    torch_model = build_torch_transformer(dict(NANO_STYLE), seed=5)
    cfg = jax_config(torch_model)
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    jmodel = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla")
    params = jax.tree.map(jnp.asarray, params_from_torch_state(state, cfg, jmodel.abstract_params()))
    adapters = _random_adapters(params, rank=2, seed=3)
    scale = 1.5
    peft = peft_state(adapters, lora.adapter_paths(adapters), scale, cfg)
    assert "transformer.layers.0.self_attn.add_q_proj.lora_A.weight" in peft  # generator q_proj (diffusers name)
    assert peft["transformer.layers.1.mlp_moe_gen.up_proj.lora_B.weight"].shape == (cfg.intermediate_size, 2)
    assert "transformer.layers.0.self_attn.to_out.lora_A.weight" in peft  # reasoner o_proj
    assert peft["transformer.proj_in.lora_A.weight"].shape == (2, cfg.patch_latent_dim)  # one module, no layers
    assert peft["transformer.proj_out.lora_B.weight"].shape == (cfg.patch_latent_dim, 2)
    with pytest.raises(ValueError, match="generator/action_proj_in/kernel: diffusers holds the per-domain"):
        peft_state(_random_adapters(params, rank=2, targets=ACTION_TARGETS), [ACTION_TARGETS[1]], scale, cfg)

    import torch

    torch_model.load_lora_adapter({k: torch.from_numpy(v) for k, v in peft.items()}, prefix="transformer",
                                  adapter_name="cosmos_jax")
    spec = CASES["policy"]
    rng = np.random.default_rng(1)
    input_ids = rng.integers(0, cfg.vocab_size, size=7)
    latents = rng.standard_normal((1, cfg.latent_channel, *spec["latent"])).astype(np.float32)
    action = rng.standard_normal((spec["action"], cfg.action_dim)).astype(np.float32)
    segments = reference_segments(torch_model, 7, spec["latent"], 24.0, spec["clean"], 0, spec["action"], [])
    want_v, _, want_a = reference_forward(torch_model, segments, input_ids, latents, 973, None, action, 2)

    from cosmos_jax.modeling.inputs import GeneratorInputs
    from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence

    layout = layout_sequence(cfg, 7, spec["latent"], fps=24.0, clean_vision_frames=spec["clean"],
                             action_len=spec["action"], clean_action_rows=())
    text = jax.tree.map(jnp.asarray, batch_text([input_ids], [layout]))
    t = jnp.full((1,), 973.0, jnp.float32)
    gen = GeneratorInputs(position_ids=jnp.asarray(batch_generator_positions([layout])), vision=jnp.asarray(latents),
                          vision_noisy=jnp.asarray(layout.vision_noisy)[None], vision_t=t,
                          action=jnp.asarray(action)[None], action_noisy=jnp.asarray(layout.action_noisy)[None],
                          action_t=t, action_domain=jnp.array([2], jnp.int32))
    merged = lora.merge(params, [(adapters, scale)])
    out = jax.jit(jmodel.__call__)(merged, text, gen)
    for got, want in ((out.vision[0], want_v), (out.action[0], want_a)):
        got = np.asarray(got, np.float32)
        assert float(np.abs(got - want).max()) <= 2e-5 * float(np.abs(want).max())


LORA_TRAIN_SCRIPT = """
import sys
import jax, numpy as np
from cosmos_jax.training import lora
from cosmos_jax.training.loop import RunConfig, train
from cosmos_jax.training.step import OptimConfig
root = sys.argv[1]
config = lora.LoraConfig(2, lora.parse_targets("q_proj,v_proj,action_proj_in"))
def run(out, steps, cfg=config):
    optim = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=4, freeze_reasoner=True)
    return train(RunConfig(model=root + "/model.json", data=root + "/data", out=root + "/" + out, steps=steps,
                           batch=2, max_text_len=8, dtype="float32", attention="xla", mesh="fsdp=1", save_every=2,
                           optim=optim, lora=cfg), progress=False)["state"]
straight = run("straight", 4)
run("resumed", 2)
resumed = run("resumed", 4)
for name, state in (("straight", straight), ("resumed", resumed)):
    np.savez(root + "/" + name + ".npz", *[np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))])
counts = lora.trainable_counts(straight.params, straight.opt_state)
print("COUNTS", counts["trainable_parameters"], counts["optimizer_bytes"])
try:
    run("straight", 6, lora.LoraConfig(3, config.targets))
except ValueError as e:
    print("REFUSED", e)
"""


@pytest.mark.slow  # three short training runs in a subprocess: ~2 min on the loaded 2-core machine
def test_lora_training_updates_only_adapters_and_resumes_bitwise(tmp_path):
    from test_training import _write_world

    Cosmos3Config.from_dict(NANO_STYLE).to_json(tmp_path / "model.json")
    (tmp_path / "data").mkdir()
    _write_world(tmp_path / "data", count=5)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    out = subprocess.run([sys.executable, "-c", LORA_TRAIN_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    saved = lora.load_adapters(tmp_path / "straight" / "lora")
    assert lora.adapter_paths(saved.adapters) == sorted(lora.parse_targets("q_proj,v_proj,action_proj_in"))
    for path in (("layers", "q_proj"), ("action_proj_in",)):
        b = get_path(saved.adapters["generator"], (*path, "kernel", "b"))
        assert float(jnp.abs(b).max()) > 0  # trained from zero
    n_adapter = sum(x.size for x in jax.tree.leaves(saved.adapters))
    _, trainable, opt_bytes = next(line for line in out.stdout.splitlines() if line.startswith("COUNTS")).split()
    assert int(trainable) == n_adapter
    assert 2 * 4 * n_adapter <= int(opt_bytes) <= 2 * 4 * n_adapter + 64  # two fp32 Adam moments (+ counters)
    assert "REFUSED" in out.stdout and "LoRA setup" in out.stdout
    # the checkpoint holds the adapters and their optimizer state only, plus the base's fingerprint
    from cosmos_jax.training.checkpoint import TrainCheckpointer

    manager = TrainCheckpointer(str(tmp_path / "straight" / "checkpoints"))
    assert manager.all_steps()[-1] == 4
    manager.close()
    meta = json.loads((tmp_path / "straight" / "lora" / "adapter.json").read_text())
    assert meta["base_fingerprint"] == saved.base_fingerprint and len(saved.base_fingerprint) == 64
    stored = sum(f.stat().st_size for f in (tmp_path / "straight" / "checkpoints" / "4").rglob("*") if f.is_file())
    base_bytes = 4 * sum(np.prod(x.shape) for x in jax.tree.leaves(
        Cosmos3Transformer(Cosmos3Config.from_dict(NANO_STYLE)).abstract_params()))
    assert stored < base_bytes / 4  # far less than the fp32 base weights


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "tiny", "--data", "d", "--out", "o", "--lora-rank", "2", "--lora-targets", "qkv"],
     "--lora-targets 'qkv'"),
    (["train", "--config", "tiny", "--data", "d", "--out", "o", "--lora-targets", "q_proj"],
     "--lora-targets and --lora-alpha need --lora-rank"),
    (["generate", "--model", ".", "--prompt", "x", "--output", "o.mp4", "--merge-lora"],
     "--merge-lora needs at least one --lora"),
    (["generate", "--model", ".", "--prompt", "x", "--output", "o.mp4", "--lora", "missing_dir"],
     "--lora missing_dir: not a LoRA folder"),
    (["generate", "--model", ".", "--prompt", "x", "--output", "o.mp4", "--lora", "d", "--quantize", "int8"],
     "--lora cannot be combined with --quantize"),
])
def test_cli_refuses_bad_lora_flags_before_loading(tmp_path, argv, message):
    out = subprocess.run([sys.executable, "-m", "cosmos_jax.cli", *argv], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr


def test_cli_export_lora_writes_the_peft_file(tmp_path):
    from safetensors.numpy import load_file

    from cosmos_jax.config import load_preset

    cfg = load_preset("tiny")
    model = Cosmos3Transformer(cfg, dtype=jnp.float32)
    params = _random_params(model, 2)
    config = lora.LoraConfig(2, lora.parse_targets("q_proj,up_proj"), alpha=4.0)
    rng = np.random.default_rng(4)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                            lora.init_adapters(params, config, jax.random.key(0)))
    lora.save_adapters(tmp_path / "ad", adapters, config, lora.fingerprint(params))
    done = subprocess.run([sys.executable, "-m", "cosmos_jax.cli", "export", "--lora", str(tmp_path / "ad"),
                           str(tmp_path / "peft"), "--config", "tiny"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    written = load_file(str(tmp_path / "peft" / "pytorch_lora_weights.safetensors"))
    want = peft_state(adapters, lora.adapter_paths(adapters), 2.0, cfg)
    assert sorted(written) == sorted(want) and len(want) == 4 * cfg.num_hidden_layers
    for key, value in want.items():
        np.testing.assert_array_equal(written[key], value)
    again = subprocess.run([sys.executable, "-m", "cosmos_jax.cli", "export", "--lora", str(tmp_path / "ad"),
                            str(tmp_path / "peft"), "--config", "tiny"], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    action = lora.LoraConfig(2, lora.parse_targets("q_proj,action_proj_out"))
    lora.save_adapters(tmp_path / "act", lora.init_adapters(params, action, jax.random.key(1)), action,
                       lora.fingerprint(params))
    refused = subprocess.run([sys.executable, "-m", "cosmos_jax.cli", "export", "--lora", str(tmp_path / "act"),
                              str(tmp_path / "peft2"), "--config", "tiny"], capture_output=True, text=True)
    assert refused.returncode == 2 and "action_proj_out/kernel: diffusers holds the per-domain" in refused.stderr
    assert not (tmp_path / "peft2" / "pytorch_lora_weights.safetensors").exists()

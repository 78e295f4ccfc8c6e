"""The published FP8 revision (cosmos_jax/convert/modelopt_fp8.py) against the reference's own W8A16 code.

A tiny diffusers transformer is quantized to E4M3 with one scale per tensor and saved in ModelOpt's serialized
layout (`weight` float8_e4m3fn, `weight_quantizer._scale`, `_amax` buffers) with the official step policy in its
config.json. The torch side runs every quantized linear through diffusers' own `_w8a16_linear` (the formula
`w.to(x.dtype) * scale`, then F.linear): nvidia-modelopt's restore path is not needed for that. fp32 vs fp32,
max abs error <= 2e-5 of the output scale. The policy, step schedule and linear grouping are checked against
diffusers' `parse_diffusion_step_policy`, `Cosmos3MixedPrecisionConfig` and `_classify_cosmos3_linear`.
"""

from __future__ import annotations

import copy
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.pipelines.cosmos import mixed_precision as reference_mp

from cosmos_jax.config import ConfigError
from cosmos_jax.convert.keymap_transformer import LINEAR, KeyMapError, key_table
from cosmos_jax.convert.modelopt_fp8 import W8A8, W8A16, StepPolicy, fallback_note, linear_group, parse_policy
from cosmos_jax.convert.load import load
from cosmos_jax.modeling.inputs import GeneratorInputs
from cosmos_jax.modeling.weights import is_quantized
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence
from torch_reference import NANO_STYLE, build_torch_transformer, jax_config, reference_forward, reference_segments

FP32_REL_TOL = 2e-5
QUANT_CONFIG = {"quant_method": "modelopt", "quant_type": "FP8",
                "runtime": {"diffusion_step_policy": reference_mp.FIRST_LAST_N_FP8_POLICY}}


def _linear_names(config) -> list[str]:
    """Module names of every Linear in the key table (layer linears and top-level projections) except the LM head
    and the time embedder, which ModelOpt's diffusers export keeps unquantized (`_keep_in_fp32_modules`)."""
    names = []
    for entry in key_table(config):
        if (entry.transform == LINEAR and entry.torch_key.endswith(".weight") and "lm_head" not in entry.torch_key
                and "time_embedder" not in entry.torch_key):
            names += [k.removesuffix(".weight") for k in entry.torch_keys(config.num_hidden_layers)]
    return names


def _write_fp8_revision(model, folder, quant_config=QUANT_CONFIG, scale_shape=()):
    """Quantize `model`'s linears in place to E4M3 per tensor and save the ModelOpt layout; returns the names."""
    model.save_pretrained(str(folder), safe_serialization=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = _linear_names(jax_config(model))
    for name in names:
        w = state[f"{name}.weight"].float()
        amax = w.abs().max()
        scale = amax / 448.0
        state[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        state[f"{name}.weight_quantizer._scale"] = scale.expand(scale_shape).clone()
        state[f"{name}.weight_quantizer._amax"] = amax.clone()
        state[f"{name}.input_quantizer._amax"] = torch.tensor(4.0)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    safetensors.torch.save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quant_config
    (folder / "config.json").write_text(json.dumps(config))
    return names, state


def _reference_w8a16(model, names, state):
    """A copy of `model` whose quantized linears run diffusers' `_w8a16_linear` on the saved fp8 weights."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name in names:
        layer = modules[name]
        layer.weight = torch.nn.Parameter(state[f"{name}.weight"], requires_grad=False)
        layer.weight_quantizer = types.SimpleNamespace(_scale=state[f"{name}.weight_quantizer._scale"])
        layer.forward = lambda x, _layer=layer, _name=name: reference_mp._w8a16_linear(_layer, x, _name)
    return ref


@pytest.fixture(scope="module")
def revision(tmp_path_factory):
    model = build_torch_transformer(dict(NANO_STYLE), seed=3)
    folder = tmp_path_factory.mktemp("fp8") / "transformer"
    names, state = _write_fp8_revision(model, folder)
    return model, folder, _reference_w8a16(model, names, state)


CASES = {
    "t2v": dict(latent=(3, 4, 6), clean=[], action=0, clean_rows=None),
    "policy": dict(latent=(3, 4, 4), clean=[0], action=6, clean_rows=[]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_revision_matches_the_reference_w8a16(revision, case):
    model, folder, reference = revision
    spec = CASES[case]
    cfg = jax_config(model)
    rng = np.random.default_rng(7)
    und_len, fps, t_step, domain = 7, 24.0, 973, 2
    input_ids = rng.integers(0, cfg.vocab_size, size=und_len)
    latents = rng.standard_normal((1, cfg.latent_channel, *spec["latent"])).astype(np.float32)
    action = rng.standard_normal((spec["action"], cfg.action_dim)).astype(np.float32) if spec["action"] else None
    segments = reference_segments(model, und_len, spec["latent"], fps, spec["clean"], 0, spec["action"],
                                  spec["clean_rows"])
    want = reference_forward(reference, segments, input_ids, latents, t_step, None, action, domain)
    full = reference_forward(model, segments, input_ids, latents, t_step, None, action, domain)

    loaded = load(folder, dtype=jnp.float32, components=("transformer",))
    assert loaded.fp8_revision and loaded.fp8_policy == StepPolicy(3, 3, True, True)
    q = loaded.params["generator"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert is_quantized(q) and q.qvalue.dtype == jnp.float8_e4m3fn and q.scale.shape == (cfg.num_hidden_layers, 1, 1)
    assert not is_quantized(loaded.params["generator"]["proj_in"]["kernel"])  # dequantized once at load

    layout = layout_sequence(cfg, und_len, spec["latent"], fps=fps, clean_vision_frames=spec["clean"],
                             action_len=spec["action"], clean_action_rows=spec["clean_rows"] or ())
    jmodel = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla")
    text = jax.tree.map(jnp.asarray, batch_text([input_ids], [layout]))
    t = jnp.full((1,), float(t_step), jnp.float32)
    b1 = lambda x: jnp.asarray(x)[None]  # noqa: E731
    gen = GeneratorInputs(
        position_ids=jnp.asarray(batch_generator_positions([layout])), vision=jnp.asarray(latents),
        vision_noisy=b1(layout.vision_noisy), vision_t=t,
        action=None if action is None else b1(action), action_noisy=None if action is None else b1(layout.action_noisy),
        action_t=None if action is None else t, action_domain=None if action is None else jnp.array([domain], jnp.int32),
    )
    cache, _ = jax.jit(jmodel.encode_reasoner)(loaded.params, text)
    out = jax.jit(jmodel.denoise_step)(loaded.params, cache, gen)
    for label, got, ref, unquantized in (("vision", out.vision, want[0], full[0]),
                                         ("action", out.action, want[2], full[2])):
        if ref is None:
            continue
        got = np.asarray(got[0], np.float32)
        scale = float(np.abs(ref).max())
        assert scale > 0.1
        err = float(np.abs(got - ref).max()) / scale
        assert err <= FP32_REL_TOL, f"{case} {label}: {err:.3g}"
        assert float(np.abs(unquantized - ref).max()) / scale > 100 * FP32_REL_TOL  # fp8 rounding is visible


def test_grouping_is_the_references():
    cfg = jax_config(build_torch_transformer(dict(NANO_STYLE, num_hidden_layers=1)))
    names = _linear_names(cfg) + ["lm_head"]
    groups = {name: linear_group(name) for name in names}
    assert groups == {name: reference_mp._classify_cosmos3_linear(name) for name in names}
    # the pairing across towers: reasoner attention with the generator MLP, and the other way round
    assert groups["layers.0.self_attn.to_q"] == groups["layers.0.mlp_moe_gen.up_proj"] == "generation"
    assert groups["layers.0.self_attn.add_q_proj"] == groups["layers.0.mlp.up_proj"] == "reasoner"


@pytest.mark.parametrize("first, last, overlap", [(3, 3, "a16"), (2, 5, "native"), (0, 1, "a16"), (4, 0, "native")])
def test_schedule_is_the_references(first, last, overlap):
    raw = dict(reference_mp.FIRST_LAST_N_FP8_POLICY, first_steps={"count": first, "mode": "a16"},
               last_steps={"count": last, "mode": "a16"}, overlap=overlap)
    ours = parse_policy(raw)
    theirs = reference_mp.parse_diffusion_step_policy(raw)
    assert (ours.first_steps, ours.last_steps, ours.overlap_a16) == (theirs.first_steps, theirs.last_steps,
                                                                      theirs.overlap == "a16")
    config = reference_mp.Cosmos3MixedPrecisionConfig(format="fp8", first_steps=first, last_steps=last,
                                                      overlap=overlap)
    for num_steps in (1, 2, 5, 8, 35):
        want = [W8A16 if config.use_high_precision(i, num_steps) else W8A8 for i in range(num_steps)]
        assert ours.schedule(num_steps) == want


def test_cpu_says_it_runs_w8a8_steps_as_w8a16():
    note = fallback_note(StepPolicy(), 8)
    assert "2 of 8 steps are W8A8" in note and "CPU backend has no fp8 matmuls" in note
    assert fallback_note(StepPolicy(3, 3), 6) is None


@pytest.fixture()
def small(tmp_path):
    return build_torch_transformer(dict(NANO_STYLE, num_hidden_layers=1), seed=4), tmp_path / "transformer"


def test_missing_scale_is_refused(small):
    model, folder = small
    _write_fp8_revision(model, folder)
    state = safetensors.torch.load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del state["layers.0.self_attn.to_k.weight_quantizer._scale"]
    safetensors.torch.save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(KeyMapError, match=r"layers.0.self_attn.to_k.weight is float8_e4m3fn but its scale "
                                          r"layers.0.self_attn.to_k.weight_quantizer._scale is missing"):
        load(folder, dtype=jnp.float32, components=("transformer",))


def test_per_channel_scale_is_refused(small):
    model, folder = small
    _write_fp8_revision(model, folder, scale_shape=(2,))
    with pytest.raises(KeyMapError, match=r"weight_quantizer._scale must be one per-tensor scale, got shape \(2,\)"):
        load(folder, dtype=jnp.float32, components=("transformer",))


@pytest.mark.parametrize("change, message", [
    (dict(type="every_other"), r"diffusion_step_policy.type: unknown policy 'every_other'"),
    (dict(schema_version=2), r"diffusion_step_policy.schema_version: unknown policy 2"),
    (dict(reasoner="w4"), r"diffusion_step_policy.reasoner: must be 'a16' or 'native', got 'w4'"),
])
def test_unknown_policy_is_refused_before_reading_weights(small, change, message):
    model, folder = small
    policy = dict(reference_mp.FIRST_LAST_N_FP8_POLICY, **change)
    _write_fp8_revision(model, folder, {**QUANT_CONFIG, "runtime": {"diffusion_step_policy": policy}})
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=message):
        load(folder, dtype=jnp.float32, components=("transformer",))


def test_other_quantization_methods_are_refused(small):
    model, folder = small
    _write_fp8_revision(model, folder, {"quant_method": "torchao", "quant_type": "int8wo"})
    with pytest.raises(ConfigError, match="only ModelOpt FP8 is supported, got quant_method='torchao'"):
        load(folder, dtype=jnp.float32, components=("transformer",))


def test_the_fp8_reasoner_is_not_loaded_for_reasoning(small):
    model, folder = small
    _write_fp8_revision(model, folder)
    with pytest.raises(ValueError, match="the FP8 revision quantizes the reasoner tower"):
        load(folder, dtype=jnp.float32, components=("transformer", "reasoner"))

"""The published FP8 revision (cosmos_jax/convert/modelopt_fp8.py) against the reference's own W8A16 and W8A8 code.

A tiny diffusers transformer is quantized to E4M3 with one scale per tensor and saved in ModelOpt's serialized
layout (`weight` float8_e4m3fn, `weight_quantizer._scale`, `_amax` buffers, `input_quantizer._amax`) with the
official step policy in its config.json. W8A16: the torch side runs every quantized linear through diffusers' own
`_w8a16_linear` (the formula `w.to(x.dtype) * scale`, then F.linear). W8A8: diffusers' own mixed-precision runtime
routes each linear per step and group to `_w8a16_linear` or the native forward, ModelOpt's `fp8_per_tensor_gemm`,
reproduced in `modelopt_fp8_gemm` with `torch._scaled_mm` (CUDA-only) emulated by its definition. nvidia-modelopt's
restore path is not needed for either. fp32 vs fp32, max abs error <= 2e-5 of the output scale; the float8
activations of the W8A8 linear are bitwise equal. The policy, step schedule and linear grouping are checked against
diffusers' `parse_diffusion_step_policy`, `Cosmos3MixedPrecisionConfig` and `_classify_cosmos3_linear`.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import types
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
import safetensors.torch
import torch
from diffusers.pipelines.cosmos import mixed_precision as reference_mp

from jax import export

from cosmos_jax.config import ConfigError, Cosmos3Config
from cosmos_jax.convert.keymap_transformer import LINEAR, KeyMapError, key_table
from cosmos_jax.convert.modelopt_fp8 import (
    W8A8,
    W8A16,
    StepPolicy,
    fallback_note,
    has_fp8_matmul,
    linear_group,
    parse_policy,
    step_w8a8_groups,
)
from cosmos_jax.convert.converter import convert
from cosmos_jax.convert.load import load
from cosmos_jax.demo import build_demo_checkpoint, demo_image
from cosmos_jax.modeling.inputs import GeneratorInputs
from cosmos_jax.modeling.linear import Linear, dynamic_input_scale, quantize_activation, w8a8_matmul
from cosmos_jax.modeling.weights import Fp8Kernel, is_quantized
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from torch_reference import NANO_STYLE, build_torch_transformer, jax_config, reference_forward, reference_segments

FP32_REL_TOL = 2e-5
INPUT_AMAX = 4.0  # the calibrated input range every linear of the test revisions declares
FP8_MIN, FP8_MAX = torch.finfo(torch.float8_e4m3fn).min, torch.finfo(torch.float8_e4m3fn).max
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


def _quantize_state(state, names, scale_shape=(), input_amax=INPUT_AMAX):
    """`state` with the linears `names` in E4M3 per tensor (ModelOpt's layout: `weight` float8_e4m3fn,
    `weight_quantizer._scale` = amax / 448, `_amax`, and `input_quantizer._amax` unless input_amax is None)."""
    state = dict(state)
    for name in names:
        w = state[f"{name}.weight"].float()
        amax = w.abs().max()
        scale = amax / 448.0
        state[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        state[f"{name}.weight_quantizer._scale"] = scale.expand(scale_shape).clone()
        state[f"{name}.weight_quantizer._amax"] = amax.clone()
        if input_amax is not None:
            state[f"{name}.input_quantizer._amax"] = torch.tensor(input_amax)
    return state


def _save_fp8_revision(folder, state, quant_config=QUANT_CONFIG):
    """Replace the transformer folder's weights by `state` and declare `quant_config` in its config.json."""
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    safetensors.torch.save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quant_config
    (folder / "config.json").write_text(json.dumps(config))


def _write_fp8_revision(model, folder, quant_config=QUANT_CONFIG, scale_shape=()):
    """Quantize `model`'s linears to E4M3 per tensor and save the ModelOpt layout; returns the names and state."""
    model.save_pretrained(str(folder), safe_serialization=True)
    names = _linear_names(jax_config(model))
    state = _quantize_state({k: v.clone() for k, v in model.state_dict().items()}, names, scale_shape)
    _save_fp8_revision(folder, state, quant_config)
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


def modelopt_fp8_gemm(x, weight_fp8, weight_amax, input_amax, bias=None):
    """ModelOpt's native W8A8 forward (`fp8_per_tensor_gemm`, nvidia-modelopt 0.47.0) on CPU, returning (output,
    x_fp8): scale_a = input amax / 448 (the input's own amax when the quantizer has none), scale_b = weight amax /
    448, its quantizer `(x / scale_a).clamp(-448, 448).to(float8_e4m3fn)` as written; `torch._scaled_mm` is
    CUDA-only, so it is emulated by its definition: both float8 operands upcast to float32, matmul, times
    scale_a * scale_b, plus the bias, cast to x's dtype."""
    amax = x.abs().max() if input_amax is None else input_amax
    scale_a, scale_b = amax.float() / 448.0, weight_amax.float() / 448.0
    x_fp8 = (x / scale_a).clamp(FP8_MIN, FP8_MAX).to(torch.float8_e4m3fn)
    acc = (x_fp8.reshape(-1, x.shape[-1]).float() @ weight_fp8.float().t()) * (scale_a * scale_b)
    acc = acc if bias is None else acc + bias.float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], -1), x_fp8


def _reference_mixed(model, names, state):
    """A copy of `model` whose quantized linears look like restored ModelOpt FP8 linears to diffusers' own
    mixed-precision runtime (`apply_cosmos3_mixed_precision_step` picks W8A16 = `_w8a16_linear` or the native
    forward per step and group); the native forward is `modelopt_fp8_gemm`. The modality projections, which that
    runtime leaves alone, run the native forward at every step."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name in names:
        layer = modules[name]
        layer.weight = torch.nn.Parameter(state[f"{name}.weight"], requires_grad=False)
        layer.weight_quantizer = types.SimpleNamespace(_scale=state[f"{name}.weight_quantizer._scale"],
                                                       amax=state[f"{name}.weight_quantizer._amax"], is_enabled=True)
        layer.input_quantizer = types.SimpleNamespace(amax=state.get(f"{name}.input_quantizer._amax"),
                                                      is_enabled=True)
        layer._should_run_real_quant_gemm = True
        layer.forward = lambda x, _layer=layer: modelopt_fp8_gemm(
            x, _layer.weight, _layer.weight_quantizer.amax, _layer.input_quantizer.amax, _layer.bias)[0]
    return ref


@pytest.fixture(scope="module")
def revision(tmp_path_factory):
    model = build_torch_transformer(dict(NANO_STYLE), seed=3)
    folder = tmp_path_factory.mktemp("fp8") / "transformer"
    names, state = _write_fp8_revision(model, folder)
    return model, folder, _reference_w8a16(model, names, state), names, state


CASES = {
    "t2v": dict(latent=(3, 4, 6), clean=[], action=0, clean_rows=None),
    "policy": dict(latent=(3, 4, 4), clean=[0], action=6, clean_rows=[]),
}


def _case_inputs(model, case):
    """One denoising step's inputs for `case`: (torch-side arguments of `reference_forward`, JAX text, JAX gen)."""
    spec = CASES[case]
    cfg = jax_config(model)
    rng = np.random.default_rng(7)
    und_len, fps, t_step, domain = 7, 24.0, 973, 2
    input_ids = rng.integers(0, cfg.vocab_size, size=und_len)
    latents = rng.standard_normal((1, cfg.latent_channel, *spec["latent"])).astype(np.float32)
    action = rng.standard_normal((spec["action"], cfg.action_dim)).astype(np.float32) if spec["action"] else None
    segments = reference_segments(model, und_len, spec["latent"], fps, spec["clean"], 0, spec["action"],
                                  spec["clean_rows"])
    layout = layout_sequence(cfg, und_len, spec["latent"], fps=fps, clean_vision_frames=spec["clean"],
                             action_len=spec["action"], clean_action_rows=spec["clean_rows"] or ())
    text = jax.tree.map(jnp.asarray, batch_text([input_ids], [layout]))
    t = jnp.full((1,), float(t_step), jnp.float32)
    b1 = lambda x: jnp.asarray(x)[None]  # noqa: E731
    gen = GeneratorInputs(
        position_ids=jnp.asarray(batch_generator_positions([layout])), vision=jnp.asarray(latents),
        vision_noisy=b1(layout.vision_noisy), vision_t=t,
        action=None if action is None else b1(action), action_noisy=None if action is None else b1(layout.action_noisy),
        action_t=None if action is None else t, action_domain=None if action is None else jnp.array([domain], jnp.int32),
    )
    return (segments, input_ids, latents, t_step, None, action, domain), text, gen


def _both_forwards(model, reference, folder, case, w8a8=frozenset()):
    """(loaded, ours, reference's, unquantized reference's) (vision, action) outputs of one denoising step of
    `case`: ours = `encode_reasoner` + `denoise_step` of the loaded revision with `w8a8` groups, fp32."""
    torch_args, text, gen = _case_inputs(model, case)
    want = reference_forward(reference, *torch_args)
    full = reference_forward(model, *torch_args)
    loaded = load(folder, dtype=jnp.float32, components=("transformer",))
    jmodel = Cosmos3Transformer(jax_config(model), dtype=jnp.float32, attention="xla", w8a8=frozenset(w8a8))
    cache, _ = jax.jit(jmodel.encode_reasoner)(loaded.params, text)
    out = jax.jit(jmodel.denoise_step)(loaded.params, cache, gen)
    return loaded, (out.vision, out.action), (want[0], want[2]), (full[0], full[2])


def _relative_errors(got, want):
    """max |got - want| / max |want| per output that exists (vision, action)."""
    errors = {}
    for label, g, w in zip(("vision", "action"), got, want):
        if w is not None:
            scale = float(np.abs(w).max())
            assert scale > 0.1
            errors[label] = float(np.abs(np.asarray(g[0], np.float32) - w).max()) / scale
    return errors


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_revision_matches_the_reference_w8a16(revision, case):
    model, folder, reference, names, _ = revision
    loaded, got, want, full = _both_forwards(model, reference, folder, case)
    cfg = jax_config(model)
    assert loaded.fp8_revision and loaded.fp8_policy == StepPolicy(3, 3, True, True)
    q = loaded.params["generator"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(q, Fp8Kernel) and is_quantized(q) and q.group == "generation"
    assert q.weight.qvalue.dtype == jnp.float8_e4m3fn and q.weight.scale.shape == (cfg.num_hidden_layers, 1, 1)
    assert q.weight_scale.dtype == jnp.float32 and np.all(np.asarray(q.input_scale) == np.float32(INPUT_AMAX / 448))
    assert loaded.params["generator"]["layers"]["q_proj"]["kernel"].group == "reasoner"  # add_q_proj
    proj_in = loaded.params["generator"]["proj_in"]["kernel"]  # a modality projection: W8A8 at every step
    assert isinstance(proj_in, Fp8Kernel) and proj_in.group == "native" and proj_in.weight.scale.shape == (1, 1)
    assert proj_in.shape == (cfg.patch_latent_dim, cfg.hidden_size) and proj_in.input_scale.shape == (1, 1)
    assert not is_quantized(loaded.params["generator"]["time_embedder"]["linear_1"]["kernel"])  # kept full precision
    for label, err in _relative_errors(got, want).items():
        assert err <= FP32_REL_TOL, f"{case} {label}: {err:.3g}"
    for label, err in _relative_errors(got, full).items():
        assert err > 100 * FP32_REL_TOL, label  # fp8 rounding is visible


W8A8_TOL = 2e-5


@pytest.mark.parametrize("reasoner_policy", ["high_precision", "base_precision"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_w8a8_step_matches_the_reference_mixed_runtime(revision, case, reasoner_policy):
    """A W8A8 step (step 4 of 8 under the official 3/3 policy): the torch side runs diffusers' own
    `Cosmos3MixedPrecisionRuntime`, which routes each linear to `_w8a16_linear` or the native forward
    (`modelopt_fp8_gemm`) by group and step; ours runs the groups `StepPolicy.w8a8_groups` names. fp32 both,
    static input scales; max abs error <= 2e-5 of the output scale."""
    model, folder, w8a16_reference, names, state = revision
    reference = _reference_mixed(model, names, state)
    config = reference_mp.Cosmos3MixedPrecisionConfig(format="fp8", reasoner_policy=reasoner_policy)
    policy = StepPolicy(3, 3, True, reasoner_policy == "high_precision")
    runtime_groups = []
    for step in range(8):
        reference_mp.apply_cosmos3_mixed_precision_step(reference, config, step, 8)
        runtime = getattr(reference, reference_mp._RUNTIME_ATTRIBUTE)
        runtime_groups.append(frozenset(g for g in ("generation", "reasoner") if not runtime.use_high_precision(g)))
    assert tuple(g | {"native"} for g in runtime_groups) == step_w8a8_groups(policy, 8, fp8_matmul=True)
    reference_mp.apply_cosmos3_mixed_precision_step(reference, config, 4, 8)
    groups = step_w8a8_groups(policy, 8, fp8_matmul=True)[4]
    assert groups == ({"generation", "native"} if reasoner_policy == "high_precision"
                      else {"generation", "reasoner", "native"})
    _, got, want, _ = _both_forwards(model, reference, folder, case, w8a8=groups)
    for label, err in _relative_errors(got, want).items():
        assert err <= W8A8_TOL, f"{case} {label}: {err:.3g}"
    _, got16, _, _ = _both_forwards(model, w8a16_reference, folder, case)  # our W8A16 step
    for label, err in _relative_errors(got16, want).items():
        assert err > 100 * W8A8_TOL, label  # the activations' fp8 rounding is visible


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
    assert "4 of 4 steps are W8A8" in fallback_note(None, 4)  # no policy: native W8A8 at every step
    assert fallback_note(StepPolicy(3, 3), 6) is None
    assert fallback_note(StepPolicy(), 8, fp8_matmul=True) is None  # asked for: the W8A8 steps run W8A8
    assert not has_fp8_matmul()
    assert step_w8a8_groups(StepPolicy(), 8, fp8_matmul=False) == (frozenset(),) * 8
    assert step_w8a8_groups(None, 2, fp8_matmul=True) == (frozenset({"generation", "reasoner", "native"}),) * 2
    assert step_w8a8_groups(StepPolicy(3, 3), 6, fp8_matmul=True) == (frozenset({"native"}),) * 6
    note = fallback_note(StepPolicy(3, 3), 6, native=True)  # no W8A8 step, but W8A8 modality projections
    assert "0 of 6 steps are W8A8" in note and "modality projections W8A8 at every step" in note


@pytest.mark.parametrize("platform, capability, want", [
    ("cpu", None, False), ("gpu", "8.6", False), ("gpu", "8.9", True), ("gpu", "9.0", True), ("gpu", "10.0", True),
    ("gpu", "gfx942", False), ("gpu", None, False), ("tpu", None, True),
])
def test_fp8_matmuls_need_compute_capability_8_9(platform, capability, want):
    """A100 (8.0/8.6) has no fp8 tensor cores, L40/H100/H200/B200 (8.9, 9.0, 10.0) do; a ROCm GPU reports no CUDA
    capability (its fp8 is e4m3fnuz, not this format)."""
    assert has_fp8_matmul(types.SimpleNamespace(platform=platform, compute_capability=capability)) is want


def _fp8_kernel_pair(rng, n_in=64, n_out=48, input_amax=None):
    """A torch E4M3 weight [out, in] with its amax, and the same as an `Fp8Kernel` [in, out]."""
    w = torch.from_numpy(rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05)
    weight_amax = w.abs().max()
    w_fp8 = (w / (weight_amax / 448.0)).to(torch.float8_e4m3fn)
    values = w_fp8.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).T
    scale = (weight_amax.float() / 448.0).numpy().reshape(1, 1)
    input_scale = None if input_amax is None else (input_amax.float() / 448.0).numpy().reshape(1, 1)
    kernel = Fp8Kernel(weight=qwix.QArray(qvalue=jnp.asarray(values), scale=jnp.asarray(scale),
                                          qtype=jnp.float8_e4m3fn),
                       weight_scale=jnp.asarray(scale), input_scale=None if input_scale is None else jnp.asarray(
                           input_scale), group="generation")
    return w_fp8, weight_amax, kernel


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_w8a8_linear_matches_modelopt_fp8_gemm(static):
    """`Linear` holding an `Fp8Kernel` against `modelopt_fp8_gemm`, fp32 activations [2, 5, 64] -> [2, 5, 48]: the
    float8 activations are bitwise equal, the outputs within 1e-6 of the output scale (the float32 sums of the two
    matmuls run in different orders). Static: input amax 3, below some |x| (those clamp to ±448). Dynamic: the
    reference is called once per row, as its calls hold one sample each."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 64)) * 1.5).astype(np.float32)
    x[0, 0, :4] = [9.0, -12.0, 5.0, 7.0]
    input_amax = torch.tensor(3.0) if static else None
    w_fp8, weight_amax, kernel = _fp8_kernel_pair(rng, input_amax=input_amax)
    rows = [modelopt_fp8_gemm(torch.from_numpy(x[b : b + 1]), w_fp8, weight_amax, input_amax) for b in range(2)]
    want = np.concatenate([r[0].numpy() for r in rows])
    want_fp8 = np.concatenate([r[1].view(torch.uint8).numpy() for r in rows])

    got = np.asarray(Linear(48, jnp.float32, jnp.float32).apply({"params": {"kernel": kernel}}, jnp.asarray(x)))
    scale = kernel.input_scale.reshape(()) if static else dynamic_input_scale(jnp.asarray(x))
    got_fp8 = np.asarray(quantize_activation(jnp.asarray(x), scale)).view(np.uint8)
    np.testing.assert_array_equal(got_fp8, want_fp8)
    if static:
        assert (np.abs(x) > 3.0).sum() > 4  # these clamp to ±448
    assert float(np.abs(got - want).max()) <= 1e-6 * float(np.abs(want).max())
    bias = (rng.standard_normal(48) * 0.1).astype(np.float32)  # a modality projection's: Linear(use_bias=True)
    want_b = np.concatenate([modelopt_fp8_gemm(torch.from_numpy(x[b : b + 1]), w_fp8, weight_amax, input_amax,
                                               torch.from_numpy(bias))[0].numpy() for b in range(2)])
    got_b = np.asarray(Linear(48, jnp.float32, jnp.float32, use_bias=True).apply(
        {"params": {"kernel": kernel, "bias": jnp.asarray(bias)}}, jnp.asarray(x)))
    assert float(np.abs(got_b - want_b).max()) <= 1e-6 * float(np.abs(want_b).max())
    assert float(np.abs(got_b - got).max()) > 0.05  # the bias is there


F8_DOT = re.compile(r"stablehlo\.dot_general[^\n]*\(tensor<[0-9x]*xf8E4M3FN>, tensor<[0-9x]*xf8E4M3FN>\) -> "
                    r"tensor<[0-9x]*xf32>")


def test_w8a8_lowers_to_fp8_dots_for_cuda(revision):
    """Exported for the cuda platform from this CPU-only machine: the StableHLO XLA:GPU receives has one
    dot_general on two f8E4M3FN operands with an f32 result per W8A8 linear, none for the W8A16 ones (a
    generator layer runs its MLP's 3 linears in "generation", its 4 attention projections in "reasoner"; the
    reasoner pass, its 4 attention projections in "generation"; a video step's proj_in and proj_out are
    "native"). Which cuBLASLt kernel XLA:GPU picks is decided
    when compiling on a GPU, which this machine cannot do."""
    model, folder, *_ = revision
    cfg = jax_config(model)
    params = load(folder, dtype=jnp.bfloat16, components=("transformer",)).params
    _, text, gen = _case_inputs(model, "t2v")
    gen = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, gen)

    def lowered(fn, *args):
        structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
        return export.export(jax.jit(fn), platforms=["cuda"])(*structs).mlir_module()

    for groups, generator_dots, reasoner_dots in ((set(), 0, 0), ({"generation"}, 3, 4),
                                                  ({"generation", "reasoner"}, 7, 7),
                                                  ({"native"}, 2, 0)):  # proj_in and proj_out
        jmodel = Cosmos3Transformer(cfg, dtype=jnp.bfloat16, attention="xla", w8a8=frozenset(groups))
        cache = jax.eval_shape(lambda p, t: jmodel.encode_reasoner(p, t)[0], params, text)
        assert len(F8_DOT.findall(lowered(jmodel.denoise_step, params, cache, gen))) == generator_dots
        assert len(F8_DOT.findall(lowered(lambda p, t: jmodel.encode_reasoner(p, t)[0], params, text))) \
            == reasoner_dots
    single = lowered(w8a8_matmul, jnp.zeros((2, 16, 64), jnp.bfloat16), _fp8_kernel_pair(np.random.default_rng(1))[2])
    assert len(F8_DOT.findall(single)) == 1 and "tensor<2x16x48xbf16>" in single


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


def test_convert_refuses_the_revision_and_says_to_load_it_as_it_is(small, tmp_path):
    model, folder = small
    _write_fp8_revision(model, folder)
    with pytest.raises(ValueError, match="quantization_config.*load the folder as it is"):
        convert(folder.parent, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_fp8_reasoner_is_not_loaded_for_reasoning(small):
    model, folder = small
    _write_fp8_revision(model, folder)
    with pytest.raises(ValueError, match="the FP8 revision quantizes the reasoner tower"):
        load(folder, dtype=jnp.float32, components=("transformer", "reasoner"))


@pytest.fixture(scope="module")
def fp8_demo(tmp_path_factory):
    """The tiny demo pipeline (`cosmos_jax/demo.py`) with its transformer as an FP8 revision under the official
    policy, without calibrated input amax (W8A8 takes each activation's own amax, ModelOpt's fallback)."""
    root = tmp_path_factory.mktemp("fp8_demo")
    folder = root / "fp8"
    shutil.copytree(build_demo_checkpoint(root / "demo"), folder)
    transformer = folder / "transformer"
    state = {}
    for path in sorted(transformer.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(path)))
    names = _linear_names(Cosmos3Config.from_json(transformer / "config.json"))
    _save_fp8_revision(transformer, _quantize_state(state, names, input_amax=None))
    return folder


PIPELINE_W8A8_BOUND = 0.1


@pytest.mark.slow
def test_pipeline_runs_the_w8a8_middle_steps_when_asked(fp8_demo):
    """8 policy steps (layers: 3 W8A16, 2 W8A8, 3 W8A16; the modality projections W8A8 at every step) on CPU with
    `fp8_matmul=True` against the default run, which does
    every step W8A16 and says so: finite, different, and within a relative L2 error of 0.1 of it (latents and
    actions, fp32); the offloaded run (one reasoner cache per step variant) equals the resident one within 1e-6."""
    request = GenerationRequest("Pick up the dark block.", image=demo_image(), action_mode="policy",
                                domain="bridge_orig_lerobot", chunk=8, resolution_tier=256, steps=8, guidance=1.0,
                                seed=0, output_type="latent")
    w8a16 = Cosmos3Pipeline.from_pretrained(fp8_demo, dtype=jnp.float32, attention="xla")
    w8a8 = Cosmos3Pipeline.from_pretrained(fp8_demo, dtype=jnp.float32, attention="xla", fp8_matmul=True)
    assert w8a16.step_w8a8(8) == (frozenset(),) * 8
    native = frozenset({"native"})
    assert w8a8.step_w8a8(8) == (native,) * 3 + (native | {"generation"},) * 2 + (native,) * 3
    with pytest.warns(UserWarning, match="2 of 8 steps are W8A8 .*the CPU backend has no fp8 matmuls"):
        base = w8a16(request, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = w8a8(request, progress=False)
    assert not [w for w in caught if "FP8 revision" in str(w.message)]
    for a, b in ((got.latents, base.latents), (got.actions, base.actions)):
        assert np.isfinite(a).all()
        err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        assert 1e-4 < err < PIPELINE_W8A8_BOUND, err
    offloaded = Cosmos3Pipeline.from_pretrained(fp8_demo, dtype=jnp.float32, attention="xla", fp8_matmul=True,
                                                offload_reasoner=True)(request, progress=False)
    for a, b in ((offloaded.latents, got.latents), (offloaded.actions, got.actions)):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()

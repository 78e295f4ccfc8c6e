"""Parity of the JAX transformer with diffusers' Cosmos3OmniTransformer (weights carried through safetensors).

fp32 vs fp32: max abs error relative to the output's max abs value must be <= 2e-5.
bf16 vs bf16: max abs error <= 2x the reference's own bf16-vs-fp32 spread on the same inputs (plus 1e-2 of the
output scale): bf16 rounding differs between XLA and torch, so the reference's spread is the yardstick.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cosmos_jax.convert.keymap_transformer import params_from_torch_state
from cosmos_jax.modeling.inputs import GeneratorInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer, cast_params
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence
from torch_reference import (
    EDGE_STYLE,
    NANO_STYLE,
    build_torch_transformer,
    jax_config,
    reference_forward,
    reference_segments,
    save_and_read_state,
)

FP32_REL_TOL = 2e-5


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
    style = {"nano": NANO_STYLE, "edge": EDGE_STYLE}[request.param]
    # module scope + indirect parametrisation: one torch model per style for the whole file
    model = build_torch_transformer(style, seed=1)
    state = save_and_read_state(model, str(tmp_path_factory.mktemp(request.param)))
    return request.param, model, state


def _jax_params(model, state, dtype, attention="xla"):
    cfg = jax_config(model)
    jmodel = Cosmos3Transformer(cfg, dtype=dtype, attention=attention)
    params = params_from_torch_state(state, cfg, jmodel.abstract_params())
    params = jax.tree.map(lambda x: jnp.asarray(x), params)
    return jmodel, cast_params(params, dtype)


CASES = {
    "t2v": dict(latent=(3, 4, 6), clean=[], sound=0, action=0, clean_rows=None),
    "i2v": dict(latent=(3, 4, 6), clean=[0], sound=0, action=0, clean_rows=None),
    "v2v": dict(latent=(4, 4, 4), clean=[0, 1], sound=0, action=0, clean_rows=None),
    "odd_hw": dict(latent=(2, 5, 7), clean=[], sound=0, action=0, clean_rows=None),
    "sound": dict(latent=(3, 4, 4), clean=[], sound=5, action=0, clean_rows=None),
    "forward_dynamics": dict(latent=(3, 4, 4), clean=[0], sound=0, action=6, clean_rows=list(range(6))),
    "inverse_dynamics": dict(latent=(3, 4, 4), clean=[0, 1, 2], sound=0, action=6, clean_rows=[]),
    "policy": dict(latent=(3, 4, 4), clean=[0], sound=0, action=6, clean_rows=[]),
}


def _run_case(name, model, state, case, dtype, torch_dtype, cached, attention="xla"):
    cfg = jax_config(model)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    und_len, fps, t_step, domain = 7, 24.0, 973, 2
    input_ids = rng.integers(0, cfg.vocab_size, size=und_len)
    latents = rng.standard_normal((1, cfg.latent_channel, *case["latent"])).astype(np.float32)
    sound = rng.standard_normal((cfg.sound_dim, case["sound"])).astype(np.float32) if case["sound"] else None
    action = rng.standard_normal((case["action"], cfg.action_dim)).astype(np.float32) if case["action"] else None

    segments = reference_segments(model, und_len, case["latent"], fps, case["clean"], case["sound"], case["action"],
                                  case["clean_rows"])
    fp32_want = reference_forward(model, segments, input_ids, latents, t_step, sound, action, domain)
    model_ref = copy.deepcopy(model).to(torch_dtype)
    model_ref.time_embedder.float()  # as from_pretrained(torch_dtype=bf16) keeps it (_keep_in_fp32_modules)
    want_v, want_s, want_a = reference_forward(model_ref, segments, input_ids, latents, t_step, sound, action, domain,
                                                dtype=torch_dtype)

    layout = layout_sequence(cfg, und_len, case["latent"], fps=fps, clean_vision_frames=case["clean"],
                             sound_len=case["sound"], action_len=case["action"],
                             clean_action_rows=case["clean_rows"] or ())
    np.testing.assert_array_equal(layout.position_ids, segments["position_ids"].float().numpy())
    jmodel, params = _jax_params(model, state, dtype, attention)
    text = batch_text([input_ids], [layout])
    text = jax.tree.map(jnp.asarray, text)
    b1 = lambda x: jnp.asarray(x)[None]  # noqa: E731
    t = jnp.full((1,), float(t_step), jnp.float32)
    gen = GeneratorInputs(
        position_ids=jnp.asarray(batch_generator_positions([layout])),
        vision=jnp.asarray(latents), vision_noisy=b1(layout.vision_noisy), vision_t=t,
        sound=None if sound is None else b1(sound), sound_noisy=None if sound is None else jnp.ones((1, case["sound"]), bool),
        sound_t=None if sound is None else t,
        action=None if action is None else b1(action), action_noisy=None if action is None else b1(layout.action_noisy),
        action_t=None if action is None else t, action_domain=None if action is None else jnp.array([domain], jnp.int32),
    )
    if cached:
        cache, _ = jax.jit(jmodel.encode_reasoner)(params, text)
        out = jax.jit(jmodel.denoise_step)(params, cache, gen)
    else:
        out = jax.jit(jmodel.__call__)(params, text, gen)
    pairs = [("vision", out.vision[0], want_v), ("sound", None if out.sound is None else out.sound[0], want_s),
             ("action", None if out.action is None else out.action[0], want_a)]
    errors = {}
    for (label, got, want), want32 in zip(pairs, fp32_want):
        assert (got is None) == (want is None), label
        if want is None:
            continue
        got = np.asarray(got, dtype=np.float32)
        any_noisy = {"vision": layout.vision_noisy.any(), "sound": True, "action": layout.action_noisy.any()}
        if not any_noisy[label]:
            assert np.all(want == 0) and np.all(got == 0), f"{label}: all clean, so velocities must be zero"
            continue
        scale = float(np.abs(want).max())
        assert scale > 0.1, f"{label}: reference output is degenerate"
        err = float(np.abs(got - want).max()) / scale
        errors[label] = err
        if dtype == jnp.float32:
            tol = FP32_REL_TOL
        else:
            tol = 2 * float(np.abs(want - want32).max()) / scale + 1e-2
        assert err <= tol, f"{name} {label}: relative max error {err:.3g} > {tol}"
    return errors


def _style_cases(cases):
    """(style, case) pairs: Edge has no sound head, so sound cases run on the Nano-style config only."""
    return [(style, case) for style in ("nano", "edge") for case in cases if style == "nano" or case != "sound"]


@pytest.mark.parametrize("reference, case", _style_cases(sorted(CASES)), indirect=["reference"])
def test_fp32_parity(reference, case):
    style, model, state = reference
    _run_case(f"{style}-{case}", model, state, CASES[case], jnp.float32, torch.float32, cached=False)


@pytest.mark.parametrize("reference, case", _style_cases(["i2v", "policy"]), indirect=["reference"])
def test_fp32_parity_through_reasoner_cache(reference, case):
    style, model, state = reference
    _run_case(f"{style}-{case}-cached", model, state, CASES[case], jnp.float32, torch.float32, cached=True)


@pytest.mark.parametrize("reference, case", _style_cases(["i2v", "forward_dynamics"]), indirect=["reference"])
def test_bf16_parity(reference, case):
    style, model, state = reference
    _run_case(f"{style}-{case}-bf16", model, state, CASES[case], jnp.bfloat16, torch.bfloat16, cached=False)


@pytest.mark.parametrize("attention", ["blocked", "pallas"])
@pytest.mark.parametrize("reference, case", _style_cases(["sound", "policy"]), indirect=["reference"])
def test_fp32_parity_with_each_attention_implementation(reference, case, attention):
    style, model, state = reference
    _run_case(f"{style}-{case}-{attention}", model, state, CASES[case], jnp.float32, torch.float32, cached=False,
              attention=attention)

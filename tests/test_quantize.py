"""Weight-only quantization through qwix (cosmos_jax/convert/quantize.py, cosmos_jax/modeling/quantized.py).

Pins: per-layer, per-output-channel scales on scanned stacks (equal to quantizing each layer alone); the rules
(only layer linears); the int8/fp8 rounding bounds; the model run on quantized weights equals the model run on
the same weights dequantized up front (fp32, 1e-6 relative); streaming quantization during `load` equals
quantizing the loaded tree; bad --quantize values refused before anything loads.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from cosmos_jax.config import load_preset
from cosmos_jax.convert.quantize import (
    check_mode,
    is_quantized_path,
    leaf_bytes,
    quantize_array,
    quantize_params,
    tree_bytes,
)
from cosmos_jax.demo import build_demo_checkpoint
from cosmos_jax.convert.load import load
from cosmos_jax.modeling.inputs import GeneratorInputs, TextInputs
from cosmos_jax.modeling.weights import is_quantized, materialize_tree
from cosmos_jax.modeling.transformer import Cosmos3Transformer


def _stack(seed: int = 0, layers: int = 3, n_in: int = 16, n_out: int = 24) -> jax.Array:
    rng = np.random.default_rng(seed)
    # each layer and output channel on its own scale, so a shared scale would show
    scales = rng.uniform(0.01, 10.0, size=(layers, 1, n_out))
    return jnp.asarray(rng.standard_normal((layers, n_in, n_out)) * scales, jnp.float32)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_stacked_scales_are_per_layer_and_output_channel(mode):
    stack = _stack()
    q = quantize_array(stack, mode, stacked=True, scale_dtype=jnp.float32)
    assert q.scale.shape == (3, 1, 24)
    for i in range(3):
        alone = quantize_array(stack[i], mode, stacked=False, scale_dtype=jnp.float32)
        assert alone.scale.shape == (1, 24)
        np.testing.assert_array_equal(np.asarray(q.scale[i]), np.asarray(alone.scale))
        np.testing.assert_array_equal(np.asarray(q.qvalue[i], np.float32), np.asarray(alone.qvalue, np.float32))
    # the single-kernel axis (1) used on a stack reduces over layers and outputs instead: the known pitfall
    naive = qwix.quantize(stack, jnp.int8, channelwise_axes=(1,))
    assert naive.scale.shape == (1, 16, 1)


@pytest.mark.parametrize("mode, bound", [("int8", 0.5 / 127), ("fp8", 2.0**-4)])
def test_rounding_error_within_the_format_bound(mode, bound):
    stack = _stack(seed=1)
    back = np.asarray(qwix.dequantize(quantize_array(stack, mode, stacked=True, scale_dtype=jnp.float32)))
    x = np.asarray(stack)
    channel_max = np.abs(x).max(axis=1, keepdims=True)
    if mode == "int8":  # uniform grid: half a step of absmax/127
        assert np.all(np.abs(back - x) <= bound * channel_max * (1 + 1e-6))
    else:  # E4M3: 3 mantissa bits, relative half-ulp for normal values
        normal = np.abs(x) >= channel_max / 448 * 2.0**-6
        assert np.all(np.abs(back - x)[normal] <= bound * np.abs(x)[normal] * (1 + 1e-6))
    assert np.abs(back - x).max() > 0  # something was actually rounded


def test_rules_quantize_only_the_layer_linears():
    abstract = Cosmos3Transformer(load_preset("tiny"), dtype=jnp.bfloat16).abstract_params()
    quantized = jax.eval_shape(lambda p: quantize_params(p, "int8"), abstract)
    flat = jax.tree_util.tree_flatten_with_path(quantized, is_leaf=is_quantized)[0]
    picked = sorted("/".join(str(k.key) for k in keys) for keys, leaf in flat if is_quantized(leaf))
    kept = sorted("/".join(str(k.key) for k in keys) for keys, leaf in flat if not is_quantized(leaf))
    linears = [f"{tower}/layers/{name}/kernel" for tower in ("generator", "reasoner")
               for name in ("k_proj", "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj", "o_proj", "q_proj", "v_proj")]
    assert picked == sorted(linears)
    for name in ("reasoner/embed_tokens/embedding", "reasoner/lm_head/kernel", "generator/time_embedder/linear_1/kernel",
                 "generator/proj_in/kernel", "generator/proj_out/kernel", "generator/action_proj_out/kernel",
                 "generator/layers/input_norm/scale", "generator/layers/q_norm/scale"):
        assert name in kept
    assert not is_quantized_path(("generator", "norm", "scale"))


def test_bytes_follow_the_values_and_scales():
    abstract = Cosmos3Transformer(load_preset("tiny"), dtype=jnp.bfloat16).abstract_params()
    quantized = jax.eval_shape(lambda p: quantize_params(p, "fp8"), abstract)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    expected = sum(leaf_bytes(tuple(str(k.key) for k in keys), x.shape, x.dtype, "fp8") for keys, x in flat)
    assert tree_bytes(quantized) == expected
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    assert expected < full


def _inputs(cfg):
    rng = np.random.default_rng(0)
    und = 6
    text = TextInputs(
        input_ids=jnp.asarray(rng.integers(0, cfg.vocab_size, (1, und)), jnp.int32),
        und_len=jnp.array([und], jnp.int32),
        position_ids=jnp.broadcast_to(jnp.arange(und, dtype=jnp.float32), (1, 3, und)),
    )
    p = cfg.latent_patch_size
    tokens = 2 * 2
    gen = GeneratorInputs(
        position_ids=jnp.broadcast_to(und + jnp.arange(tokens, dtype=jnp.float32), (1, 3, tokens)),
        vision=jnp.asarray(rng.standard_normal((1, cfg.latent_channel, 1, 2 * p, 2 * p)), jnp.float32),
        vision_noisy=jnp.ones((1, 1), bool), vision_t=jnp.array([500.0], jnp.float32),
    )
    return text, gen


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_model_on_quantized_weights_equals_dequantized_weights(mode):
    cfg = load_preset("tiny")
    model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla")
    params = model.init(jax.random.key(0))
    quantized = quantize_params(params, mode)
    text, gen = _inputs(cfg)
    got = jax.jit(model.__call__)(quantized, text, gen).vision
    want = jax.jit(model.__call__)(materialize_tree(quantized), text, gen).vision
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) <= 1e-6 * scale
    cache, _ = jax.jit(model.encode_reasoner)(quantized, text)
    cached = jax.jit(model.denoise_step)(quantized, cache, gen).vision
    assert float(jnp.abs(cached - want).max()) <= 1e-5 * scale
    kernel = params["generator"]["layers"]["q_proj"]["kernel"]
    assert float(jnp.abs(materialize_tree(quantized)["generator"]["layers"]["q_proj"]["kernel"] - kernel).max()) > 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


def test_load_quantizes_as_leaves_stream_in(demo):
    streamed = load(demo, dtype=jnp.bfloat16, components=("transformer",), quantize="int8").params
    whole = quantize_params(load(demo, dtype=jnp.bfloat16, components=("transformer",)).params, "int8")
    a = jax.tree_util.tree_flatten_with_path(streamed)[0]
    b = jax.tree_util.tree_flatten_with_path(whole)[0]
    assert [k for k, _ in a] == [k for k, _ in b]
    for (keys, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype, keys
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert streamed["generator"]["layers"]["mlp"]["up_proj"]["kernel"].qvalue.dtype == jnp.int8


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match=r"--quantize 'int4': choose one of int8, fp8"):
        check_mode("int4")
    with pytest.raises(ValueError, match="quantize"):
        load("/nonexistent", quantize="fp16")


def test_cli_refuses_bad_quantize_before_loading(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cosmos_jax.cli", "generate", "--model", str(tmp_path / "missing"), "--prompt", "x",
         "--output", str(tmp_path / "o.mp4"), "--quantize", "int4"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "--quantize 'int4': choose one of int8, fp8" in out.stderr

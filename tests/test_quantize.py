"""Weight-only quantization through qwix (cosmos_jax/convert/quantize.py, cosmos_jax/modeling/weights.py).

Pins: per-layer, per-output-channel scales on scanned stacks (equal to quantizing each layer alone); the rules
(only layer linears); the int8/fp8 rounding bounds; the model run on quantized weights equals the model run on
the same weights dequantized up front (fp32, 1e-6 relative); streaming quantization during `load` equals
quantizing the loaded tree; bad --quantize values refused before anything loads.

Stored quantization (`convert --quantize`): loading such a folder gives bit for bit the tree load-then-quantize
gives, with a peak host memory near the quantized size (child processes, RSS); mismatched modes are refused.
On a mesh (the 8 fake CPU devices of tests/conftest.py): quantized values and scales are sharded by their
kernel's row, and a quantized pipeline on `tensor=2` / `data=2,tensor=2` / `data=2,fsdp=2,tensor=2` gives the
one-device outputs within 1e-5 of their scale (fp32; measured <= 6e-7).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cosmos_jax import cli
from cosmos_jax.config import load_preset
from cosmos_jax.convert import orbax_io
from cosmos_jax.convert.converter import convert
from cosmos_jax.convert.export import export_converted
from cosmos_jax.convert.quantize import (
    QTYPES,
    check_mode,
    is_quantized_path,
    leaf_bytes,
    quantize_array,
    quantize_params,
    scale_sharding,
    tree_bytes,
)
from cosmos_jax.demo import build_demo_checkpoint, demo_image
from cosmos_jax.convert.load import load, reasoner_tower, stored_quantization
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.sharding import abstract_mesh, load_mesh_preset, make_mesh, param_logical_axes, param_specs, spec_for
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


# ------------------------------------------------------------------------------ stored quantization


@pytest.fixture(scope="module")
def folders(demo, tmp_path_factory):
    """The demo (bf16 weights) converted as stored, stored as int8 from the bf16 weights, and stored as int8 / fp8
    from fp32 (as `load(dtype=float32, quantize=...)` quantizes)."""
    root = tmp_path_factory.mktemp("converted")
    out = {"hub": demo}
    for name, dtype, mode in (("bf16", None, None), ("int8", None, "int8"), ("int8_fp32", np.float32, "int8"),
                              ("fp8_fp32", np.float32, "fp8")):
        out[name] = root / name
        convert(demo, out[name], dtype=dtype, quantize=mode)
    return out


def _assert_bitwise_equal(got, want):
    a, ta = jax.tree_util.tree_flatten_with_path(got)
    b, tb = jax.tree_util.tree_flatten_with_path(want)
    assert ta == tb  # same paths, and the QArrays' static qtype
    for (keys, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, keys
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), keys


@pytest.mark.parametrize("mode, stored_dtype", [("int8", jnp.bfloat16), ("fp8", jnp.float32)])
def test_quantized_folder_loads_what_load_then_quantize_gives(folders, mode, stored_dtype):
    """Stored as int8/fp8 values + scales (the marker says which); loaded, the very tree that quantizing the
    full-precision load gives, bit for bit, at the conversion's dtype (bf16 as stored, or fp32)."""
    folder = folders["int8"] if stored_dtype == jnp.bfloat16 else folders[f"{mode}_fp32"]
    assert stored_quantization(folder) == mode and stored_quantization(folders["bf16"]) is None
    assert orbax_io.read_marker(folder)["quantize"] == mode
    shapes = orbax_io.tree_shapes(folder / "orbax" / "generator")
    assert shapes[("layers", "mlp", "up_proj", "kernel", "qvalue")] == ((2, 64, 128), np.dtype(QTYPES[mode]))
    assert shapes[("layers", "mlp", "up_proj", "kernel", "scale")] == ((2, 1, 128), np.dtype(stored_dtype))
    assert ("layers", "mlp", "up_proj", "kernel") not in shapes
    assert shapes[("proj_in", "kernel")][1] == np.dtype(stored_dtype)  # not a layer linear: kept
    full_precision_dtype = None if stored_dtype == jnp.bfloat16 else jnp.float32  # the stored dtypes
    for dtype in (None, stored_dtype):
        got = load(folder, dtype=dtype, components=("transformer",), quantize=mode).params
        want = quantize_params(load(folders["bf16"], dtype=dtype or full_precision_dtype,
                                    components=("transformer",)).params, mode)
        _assert_bitwise_equal(got, want)
    # another load dtype than the conversion's: the stored values, the scales cast to it
    other = jnp.float32 if stored_dtype == jnp.bfloat16 else jnp.bfloat16
    kernel = load(folder, dtype=other, components=("transformer",), quantize=mode).params["reasoner"]["layers"][
        "q_proj"]["kernel"]
    stored_kernel = got["reasoner"]["layers"]["q_proj"]["kernel"]
    assert kernel.scale.dtype == other and kernel.qvalue.dtype == QTYPES[mode]
    assert np.asarray(kernel.qvalue).tobytes() == np.asarray(stored_kernel.qvalue).tobytes()
    np.testing.assert_array_equal(np.asarray(kernel.scale), np.asarray(stored_kernel.scale.astype(other)))


def test_quantized_folder_refuses_other_uses_before_loading(folders, tmp_path):
    folder = folders["int8"]
    with pytest.raises(ValueError, match=r"quantized as int8 \(convert --quantize int8\); load it with "
                                         r"quantize=int8, or convert the model again without --quantize"):
        load(folder, components=("transformer",))
    with pytest.raises(ValueError, match=r"quantized as int8, not fp8: use quantize=int8"):
        load(folder, components=("transformer",), quantize="fp8")
    with pytest.raises(ValueError, match=r"quantized as int8 \(for generation only\); the reasoner, whose "
                                         r"language model is the transformer's reasoner tower, needs full-precision"):
        reasoner_tower(folder)
    with pytest.raises(ValueError, match=r"lazy loading \(export\) needs full-precision weights"):
        export_converted(folder, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    vae_only = load(folder, components=("vae",))  # the other components are stored as usual
    assert vae_only.vae_params is not None and vae_only.params == {}
    with pytest.raises(ValueError, match=r"quantize 'int4': choose one of int8, fp8"):
        convert(folders["hub"], tmp_path / "q4", quantize="int4")
    assert not (tmp_path / "q4").exists()


def test_a_quantized_conversion_that_fails_midway_leaves_nothing(folders, tmp_path, monkeypatch):
    """The quantized leaves go through the converter's atomic write: an error after some leaves were written
    leaves neither DST nor a temporary folder."""
    from cosmos_jax.convert import converter

    calls = {"n": 0}
    real = converter.stored_leaves

    def failing(path, array, mode):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError("disk full (simulated)")
        return real(path, array, mode)

    monkeypatch.setattr(converter, "stored_leaves", failing)
    with pytest.raises(OSError, match="simulated"):
        convert(folders["hub"], tmp_path / "q", quantize="int8")
    assert calls["n"] == 12 and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_quantized_folder_peak_host_memory_near_the_quantized_size(tmp_path):
    """A 4-layer synthetic bf16 transformer (62 MiB; int8: 33 MiB) loaded in fresh child processes (CPU: device
    memory is host memory), peak RSS above the RSS before the load: from the int8 folder the peak stays under the
    bf16 tree plus a fixed 64 MiB (about 46 MiB of it is the model's abstract init, the rest orbax's restore;
    holding the bf16 tree beside the int8 one would take it to about 150 MiB), while loading bf16 then quantizing
    peaks above that (measured, loaded machine: 106-114 vs 256-290 MiB)."""
    spec = importlib.util.spec_from_file_location("bench_quantized_load", Path(__file__).parents[1] / "tools" /
                                                  "bench_quantized_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folders = bench.write_folders(tmp_path, layers=4, intermediate=2048, conversions=("bf16", "int8"))
    stored = bench.measure_load(folders["int8"], "int8")
    quantized_after = bench.measure_load(folders["bf16"], "int8")
    trees = orbax_io.read_marker(folders["bf16"])["trees"]
    bf16 = trees["reasoner"]["bytes"] + trees["generator"]["bytes"]
    assert stored["held"] == quantized_after["held"] and 0.45 * bf16 < stored["held"] < 0.6 * bf16
    assert bf16 > 60 * 2**20
    assert stored["peak"] < bf16 + 64 * 2**20 < quantized_after["peak"]


# ------------------------------------------------------------------------------ on a mesh


def test_quantized_leaves_take_their_kernels_logical_axes():
    assert param_logical_axes(("generator", "layers", "q_proj", "kernel", "qvalue"), 3) == ("layers", "embed",
                                                                                         "q_heads")
    assert param_logical_axes(("generator", "layers", "q_proj", "kernel", "scale"), 3) == ("layers", None, "q_heads")
    assert param_logical_axes(("reasoner", "layers", "mlp", "down_proj", "kernel", "scale"), 3) == ("layers", None,
                                                                                                 "embed")
    with pytest.raises(ValueError, match="generator/proj_in/kernel/scale"):  # not a quantized kernel
        param_logical_axes(("generator", "proj_in", "kernel", "scale"), 2)
    for preset in ("tiny", "edge", "nano", "super"):  # the scale's spec = its kernel's, reduced axis unsharded
        mesh_preset = load_mesh_preset(preset)
        mesh = abstract_mesh(mesh_preset.mesh)
        abstract = Cosmos3Transformer(load_preset(preset), dtype=jnp.bfloat16).abstract_params()
        quantized = jax.eval_shape(lambda p: quantize_params(p, "fp8"), abstract)
        specs = param_specs(quantized, mesh, mesh_preset.rules)
        for tower in ("reasoner", "generator"):
            for name in ("q_proj", "o_proj"):
                kernel, spec = quantized[tower]["layers"][name]["kernel"], specs[tower]["layers"][name]["kernel"]
                weight = NamedSharding(mesh, spec_for(kernel.shape, param_logical_axes(
                    (tower, "layers", name, "kernel"), 3), mesh_preset.rules, mesh))
                assert spec.qvalue == weight.spec
                assert spec.scale == scale_sharding(weight, kernel.scale.shape).spec
    assert specs["generator"]["layers"]["q_proj"]["kernel"].qvalue == P(None, "fsdp", "tensor")
    assert specs["generator"]["layers"]["q_proj"]["kernel"].scale == P(None, None, "tensor")


POLICY = dict(image=demo_image(), action_mode="policy", domain="bridge_orig_lerobot", chunk=8, resolution_tier=256,
              steps=2, guidance=2.0, seed=0, output_type="latent")
MESH_TOL = 1e-5


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def one_device(folders):
    """Policy latents and actions of the quantized demo on one device, per mode (fp32 compute)."""
    request = GenerationRequest("Pick up the dark block.", **POLICY)
    out = {}
    for mode in ("int8", "fp8"):
        result = Cosmos3Pipeline.from_pretrained(folders["hub"], dtype=jnp.float32, attention="xla",
                                                 quantize=mode)(request, progress=False)
        out[mode] = (result.latents, result.actions)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode, source, spec", [("int8", "hub", "tensor=2"), ("fp8", "hub", "tensor=2"),
                                                ("fp8", "stored", "data=2,tensor=2")])
def test_quantized_pipeline_on_a_mesh_equals_one_device(folders, one_device, mode, source, spec):
    """From the Hub folder (quantized as each device's slice is read) or the folder stored quantized from fp32
    (restored straight into the shards): the one-device outputs within 1e-5, values and scales sharded."""
    folder = folders["hub"] if source == "hub" else folders[f"{mode}_fp32"]
    devices = jax.devices()[: 2 if spec == "tensor=2" else 4]
    pipeline = Cosmos3Pipeline.from_pretrained(folder, dtype=jnp.float32, attention="xla", quantize=mode,
                                               mesh=make_mesh(spec, devices), rules=load_mesh_preset("tiny").rules)
    kernel = pipeline.params["generator"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert is_quantized(kernel) and kernel.qvalue.dtype == QTYPES[mode]
    assert kernel.qvalue.sharding.spec == P(None, None, "tensor")
    assert kernel.qvalue.addressable_shards[0].data.shape == (2, 64, 64)  # half the 128 output channels
    assert kernel.scale.sharding.spec == P(None, None, "tensor")
    assert pipeline.params["reasoner"]["layers"]["o_proj"]["kernel"].qvalue.sharding.spec == P(None, "tensor")
    result = pipeline(GenerationRequest("Pick up the dark block.", **POLICY), progress=False)
    want_latents, want_actions = one_device[mode]
    assert _rel(result.latents, want_latents) <= MESH_TOL
    assert _rel(result.actions, want_actions) <= MESH_TOL


@pytest.mark.slow
def test_cli_generates_from_a_quantized_folder_on_a_mesh(folders, one_device, tmp_path):
    """`generate --quantize int8 --mesh data=2,fsdp=2,tensor=2` on an int8 folder (all 8 devices)."""
    out = tmp_path / "policy.npy"
    demo_image().save(tmp_path / "frame.png")
    code = cli.main(["generate", "--model", str(folders["int8_fp32"]), "--prompt", "Pick up the dark block.",
                     "--image", str(tmp_path / "frame.png"), "--action-mode", "policy", "--domain",
                     "bridge_orig_lerobot", "--chunk", "8",
                     "--resolution-tier", "256", "--steps", "2", "--guidance", "2", "--seed", "0", "--dtype",
                     "float32", "--attention", "xla", "--output-type", "latent", "--output", str(out),
                     "--quantize", "int8", "--mesh", "data=2,fsdp=2,tensor=2", "--mesh-rules", "tiny",
                     "--no-progress"])
    assert code == 0
    want_latents, want_actions = one_device["int8"]
    assert _rel(np.load(out), want_latents) <= MESH_TOL
    assert _rel(np.load(tmp_path / "policy.actions.npy"), want_actions) <= MESH_TOL

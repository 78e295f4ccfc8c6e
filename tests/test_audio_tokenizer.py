"""Sound tokenizer (AVAE): parity with diffusers' Cosmos3AVAEAudioTokenizer, key map, config, input errors.

Tiny widths (dec_dim 4, enc_dim 8) with the real strides, hop 1920, 64 latent channels, n_fft 64 / hop 16.
"""
import json
import math

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer

from cosmos_jax.convert.keymap_audio import audio_key_table, audio_params_from_torch_state, audio_state_from_params
from cosmos_jax.modeling.audio_tokenizer import (
    AudioTokenizer,
    AudioTokenizerConfig,
    WeightNormConv,
    WeightNormConvTranspose,
    fold_weight_norm,
    latent_frames,
    parameter_shapes,
)

TINY = dict(dec_dim=4, enc_dim=8)


def _perturbed_reference(seed: int, **config) -> Cosmos3AVAEAudioTokenizer:
    """Reference module with Snake α/β, biases, norm scales and weight-norm g moved off their defaults."""
    torch.manual_seed(seed)
    module = Cosmos3AVAEAudioTokenizer(**config).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("weight_g"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return module


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    return _perturbed_reference(0, **TINY)


@pytest.fixture(scope="module")
def config():
    return AudioTokenizerConfig(**TINY)


@pytest.fixture(scope="module")
def params(reference, config):
    return audio_params_from_torch_state(_numpy_state(reference), config)


def _relative_error(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def test_decode_matches_reference_fp32(reference, config, params):
    latents = np.random.default_rng(0).standard_normal((2, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(latents)).numpy()
    got = np.asarray(AudioTokenizer(config).decode(params, latents))
    assert got.shape == (2, 2, 3 * 1920) and got.dtype == np.float32
    assert np.mean(np.abs(expected) >= 1.0) < 0.01  # the clamp does not hide the comparison
    assert np.abs(expected).max() > 0.5
    assert _relative_error(got, expected) < 1e-5  # measured 7.7e-7 max abs, output scale 1.0
    assert np.abs(got).max() <= 1.0
    unbatched = np.asarray(AudioTokenizer(config).decode(params, latents[1]))
    np.testing.assert_allclose(unbatched, got[1], rtol=0, atol=1e-6)


def test_decode_bf16_error_is_the_reference_bf16_error(config, params):
    """bf16 weights and activations: our error vs fp32 torch stays within the reference's own bf16 spread."""
    reference = _perturbed_reference(0, **TINY)
    latents = np.random.default_rng(0).standard_normal((1, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(latents)).numpy()
        reference_bf16 = reference.to(torch.bfloat16).decode(torch.from_numpy(latents).bfloat16()).float().numpy()
    params_bf16 = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), params)
    tokenizer = AudioTokenizer(config, dtype=jax.numpy.bfloat16, param_dtype=jax.numpy.bfloat16)
    got = tokenizer.decode(params_bf16, latents)
    assert got.dtype == jax.numpy.bfloat16
    reference_spread = np.abs(reference_bf16 - expected).max()
    assert 1e-3 < reference_spread < 0.1  # measured 0.018
    assert np.abs(np.asarray(got, np.float32) - expected).max() < 1.5 * reference_spread  # measured 0.018


def test_encode_matches_reference_fp32(reference, config, params):
    """Odd length (right padding) and items with different peaks (one batch-wide peak normalisation)."""
    rng = np.random.default_rng(1)
    waveform = rng.uniform(-1.0, 1.0, (2, 2, 5000)).astype(np.float32)
    waveform[1] *= 0.2
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(waveform)).latent_dist
    mean, std = AudioTokenizer(config).encode_posterior(params, waveform)
    assert mean.shape == std.shape == (2, 64, latent_frames(5000, config)) == (2, 64, 3)
    assert _relative_error(mean, posterior.mean.numpy()) < 1e-5  # measured ~7e-7 relative
    assert _relative_error(std, posterior.std.numpy()) < 1e-5
    np.testing.assert_array_equal(np.asarray(AudioTokenizer(config).encode(params, waveform)), np.asarray(mean))


def test_encode_matches_reference_reflect_padding_without_volume_normalisation():
    extra = dict(TINY, padding_mode="reflect", normalize_volume=False, enc_num_blocks=1)
    reference = _perturbed_reference(3, **extra)
    config = AudioTokenizerConfig(**extra)
    params = audio_params_from_torch_state(_numpy_state(reference), config)
    waveform = np.random.default_rng(2).uniform(-0.3, 0.3, (1, 2, 3840)).astype(np.float32)
    with torch.no_grad():
        expected = reference.encode(torch.from_numpy(waveform)).latent_dist.mean.numpy()
    got = AudioTokenizer(config).encode(params, waveform)
    assert got.shape == (1, 64, 2)
    assert _relative_error(got, expected) < 1e-5


def test_key_map_round_trip_is_byte_identical(reference, config, params):
    state = _numpy_state(reference)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        typed = {k: v.astype(dtype) for k, v in state.items()}
        back = audio_state_from_params(audio_params_from_torch_state(typed, config), config)
        assert list(back) != [] and set(back) == set(typed)
        for key, value in typed.items():
            assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
            assert back[key].tobytes() == value.tobytes(), key
    expected_shapes = jax.tree.map(lambda a: a.shape, parameter_shapes(config))
    assert jax.tree.map(lambda a: a.shape, params) == expected_shapes


def test_parameter_tree_exports_into_the_reference_module(config):
    """The tree `init` builds (traced with eval_shape) maps onto exactly the reference's state dict."""
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), parameter_shapes(config))
    state = audio_state_from_params(zeros, config)
    module = Cosmos3AVAEAudioTokenizer(**TINY)
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    assert set(state) == set(module.state_dict())


@pytest.mark.parametrize(
    "module, channel_axis", [(WeightNormConv(6, 7), 2), (WeightNormConvTranspose(6, 5), 1)]  # v is [K, I, O]
)
def test_weight_norm_init_sets_g_to_the_norm_of_v(module, channel_axis):
    """Like torch: g = ||v|| per output channel for Conv1d and per *input* channel for ConvTranspose1d."""
    variables = module.init(jax.random.key(0), np.zeros((1, 4, 3), np.float32))["params"]
    v, g = np.asarray(variables["kernel_v"]), np.asarray(variables["kernel_g"])
    norm_axes = tuple(a for a in range(3) if a != channel_axis)
    assert g.shape == (v.shape[channel_axis],)
    np.testing.assert_allclose(g, np.sqrt((v**2).sum(axis=norm_axes)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fold_weight_norm(v, g, axis=channel_axis)), v, rtol=1e-5, atol=1e-6)


def test_key_table_counts_the_published_model():
    rows = audio_key_table(AudioTokenizerConfig())
    numel = {prefix: sum(math.prod(r.torch_shape) for r in rows if r.torch_key.startswith(prefix))
             for prefix in ("encoder.", "decoder.")}
    assert len(rows) == 249
    assert numel == {"encoder.": 23_190_080, "decoder.": 473_097_282}


def test_state_errors_name_every_problem_at_once(reference, config):
    state = _numpy_state(reference)
    del state["decoder.conv1.weight_v"]
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    state["decoder.block.0.snake1.alpha"] = np.zeros((1, 5, 1), np.float32)
    with pytest.raises(ValueError) as err:
        audio_params_from_torch_state(state, config)
    message = str(err.value)
    assert "missing (1): decoder.conv1.weight_v" in message
    assert "unexpected (1): decoder.extra.weight" in message
    assert "decoder.block.0.snake1.alpha: got (1, 5, 1), expected (1, 64, 1)" in message


def test_params_errors_name_every_problem_at_once(config, params):
    broken = jax.tree.map(lambda a: a, params)
    del broken["decoder"]["conv_in"]["bias"]
    broken["decoder"]["snake_out"]["alpha"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError, match=r"missing \(1\): decoder/conv_in/bias[\s\S]*snake_out/alpha: got \(7,\)"):
        audio_state_from_params(broken, config)


def test_decoder_only_state_loads_without_encoder_and_refuses_to_encode(reference, config):
    state = {k: v for k, v in _numpy_state(reference).items() if k.startswith("decoder.")}
    params = audio_params_from_torch_state(state, config)
    assert set(params) == {"decoder"}
    assert set(audio_state_from_params(params, config)) == set(state)
    with pytest.raises(ValueError, match="decoder-only"):
        AudioTokenizer(config).encode(params, np.zeros((1, 2, 1920), np.float32))


@pytest.mark.parametrize(
    "latents, match",
    [
        (np.zeros((1, 32, 2), np.float32), "64 channels"),
        (np.zeros((1, 64, 0), np.float32), "empty"),
        (np.zeros((64,), np.float32), r"\[B, C, T\]"),
        (np.full((1, 64, 2), np.nan, np.float32), "non-finite"),
        (np.zeros((1, 64, 2), np.int32), "floating"),
    ],
)
def test_decode_rejects_bad_latents(config, params, latents, match):
    with pytest.raises(ValueError, match=match):
        AudioTokenizer(config).decode(params, latents)


@pytest.mark.parametrize(
    "waveform, match",
    [
        (np.zeros((1, 1, 1920), np.float32), "2 channels"),
        (np.zeros((1, 2, 0), np.float32), "empty"),
        (np.zeros((2, 1920), np.float32), r"\[B, C, N\]"),
        (np.array([[[0.0, np.inf]] * 2], np.float32), "non-finite"),
        (np.zeros((1, 2, 1920), np.int16), "floating"),
    ],
)
def test_encode_rejects_bad_waveforms(config, params, waveform, match):
    with pytest.raises(ValueError, match=match):
        AudioTokenizer(config).encode(params, waveform)


def test_config_reads_and_writes_the_diffusers_json(reference, tmp_path):
    reference.save_config(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    config = AudioTokenizerConfig.from_json_file(tmp_path / "config.json")
    assert config.dec_strides == (2, 4, 5, 6, 8) and config.hop_length == 1920 and config.dec_dim == 4
    ours = config.to_dict()
    assert ours == {k: v for k, v in written.items() if k not in ("_diffusers_version",)}
    config.to_json_file(tmp_path / "ours.json")
    assert AudioTokenizerConfig.from_json_file(tmp_path / "ours.json") == config


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(dec_type="dac"), NotImplementedError, "dec_type='dac'"),
        (dict(latent_mean=0.1), NotImplementedError, "latent_mean"),
        (dict(causal=True), NotImplementedError, "causal"),
        (dict(dec_c_mults=(1, 2, 4)), ValueError, "differ in length"),
        (dict(enc_latent_dim=96), ValueError, "mean ‖ scale"),
        (dict(hop_size=960), ValueError, "hop_size 960"),
        (dict(enc_strides=(4, 5, 3)), ValueError, "encoder compression"),
        (dict(padding_mode="mirror"), ValueError, "padding_mode"),
    ],
)
def test_config_rejects_unsupported_or_inconsistent_settings(overrides, error, match):
    with pytest.raises(error, match=match):
        AudioTokenizerConfig(**dict(TINY, **overrides))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown sound tokenizer config keys: \\['dec_dimension'\\]"):
        AudioTokenizerConfig.from_dict({"dec_dimension": 4})

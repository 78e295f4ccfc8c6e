"""Wan 2.2 VAE: fp32 parity with diffusers `AutoencoderKLWan`, the pipeline's latent normalisation, the key map,
config round trip and input validation.

The reference is a tiny random Cosmos 3-shaped VAE (z_dim 48, residual, patch 2, dim_mult [1,2,4,4], two res
blocks, temporal downsample [F,T,T]; base_dim 16, decoder_base_dim 24) with every norm gamma and bias perturbed.
Measured on CPU, fp32, batch 2, 32x48 pixels: encode max abs error ≈6e-7 on outputs of magnitude ≈0.6, decode
≈2e-6 on outputs of magnitude 1; asserted ≤ 1e-4 × max |reference|.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from cosmos_jax.convert.keymap_vae import vae_key_table, vae_params_from_torch_state, vae_state_from_params
from cosmos_jax.modeling.wan_vae import (
    WanVAEConfig,
    decode,
    decode_memory_plan,
    denormalize_latents,
    encode,
    init_params,
    normalize_latents,
)

TINY = WanVAEConfig(base_dim=16, decoder_base_dim=24)
HEIGHT, WIDTH = 32, 48
REL_TOL = 1e-4

# vae/config.json as published with Cosmos 3 (spec §1.2), including keys diffusers 0.42.1 does not model.
COSMOS3_JSON = {
    "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0.dev0",
    "_name_or_path": "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "attn_scales": [], "base_dim": 160, "clip_output": False,
    "decoder_base_dim": 256, "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "in_channels": 12, "is_residual": True,
    "latents_mean": list(WanVAEConfig().latents_mean), "latents_std": list(WanVAEConfig().latents_std),
    "num_res_blocks": 2, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
    "scale_factor_temporal": 4, "temperal_downsample": [False, True, True], "z_dim": 48,
}  # fmt: skip


@pytest.fixture(scope="module")
def torch_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    model = AutoencoderKLWan(**TINY.to_dict()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def state(torch_vae: AutoencoderKLWan) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_vae.state_dict().items()}


@pytest.fixture(scope="module")
def params(state: dict[str, np.ndarray]) -> dict:
    return vae_params_from_torch_state(state, TINY)


def _max_err(ours: jax.Array, ref: torch.Tensor) -> tuple[float, float]:
    ref_np = ref.numpy()
    assert np.asarray(ours).shape == ref_np.shape
    return float(np.abs(np.asarray(ours) - ref_np).max()), float(np.abs(ref_np).max())


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_encode_matches_diffusers(torch_vae, params, frames):
    video = torch.rand(2, 3, frames, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        ref = torch_vae.encode(video).latent_dist.mode()
    ours = encode(params, video.numpy(), TINY)
    assert ours.shape == (2, 48, 1 + (frames - 1) // 4, HEIGHT // 16, WIDTH // 16)
    err, scale = _max_err(ours, ref)
    assert scale > 0.1
    assert err <= REL_TOL * scale, f"encode {frames} frames: max abs err {err:.2e} at scale {scale:.2f}"


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 4])
def test_decode_matches_diffusers(torch_vae, params, latent_frames):
    z = torch.randn(2, 48, latent_frames, HEIGHT // 16, WIDTH // 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = torch_vae.decode(z).sample
    ours = decode(params, z.numpy(), TINY)
    assert ours.shape == (2, 3, 1 + 4 * (latent_frames - 1), HEIGHT, WIDTH)
    err, scale = _max_err(ours, ref)
    assert float(jnp.abs(ours).max()) <= 1.0
    assert err <= REL_TOL * scale, f"decode {latent_frames} latents: max abs err {err:.2e} at scale {scale:.2f}"


def test_normalize_equals_pipeline_encode_video(torch_vae, params):
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipeline

    stub = types.SimpleNamespace(
        vae=torch_vae,
        _vae_latents_mean=torch.tensor(TINY.latents_mean, dtype=torch_vae.dtype),
        _vae_latents_inv_std=1.0 / torch.tensor(TINY.latents_std, dtype=torch_vae.dtype),
    )
    video = torch.rand(2, 3, 5, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = Cosmos3OmniPipeline._encode_video(stub, video).float()
    ours = normalize_latents(encode(params, video.numpy(), TINY), TINY.latents_mean, TINY.latents_std, jnp.float32)
    err, scale = _max_err(ours, ref)
    assert err <= REL_TOL * scale, f"normalised latents: max abs err {err:.2e} at scale {scale:.2f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_normalisation_is_bit_exact(dtype):
    """Pipeline lines 451-452 (stats in the VAE dtype), 513-515 (encode) and 1911-1913 (decode), bit for bit."""
    jdtype = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
    mean_list, std_list = list(TINY.latents_mean), list(TINY.latents_std)
    mean = torch.tensor(mean_list, dtype=dtype).view(1, -1, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(std_list, dtype=dtype)).view(1, -1, 1, 1, 1)
    mu = torch.randn(1, 48, 3, 4, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    latents = torch.randn(1, 48, 3, 4, 5, generator=torch.Generator().manual_seed(2))  # fp32, as in the loop
    ref_z = ((mu - mean) * inv_std).float().numpy()
    ref_raw = (latents.to(dtype) / inv_std + mean).float().numpy()
    mu_np = mu.float().numpy().astype(ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float32)
    ours_z = normalize_latents(mu_np, mean_list, std_list, jdtype)
    ours_raw = denormalize_latents(latents.numpy(), mean_list, std_list, jdtype)
    assert ours_z.dtype == jdtype and ours_raw.dtype == jdtype
    np.testing.assert_array_equal(np.asarray(ours_z, np.float32), ref_z)
    np.testing.assert_array_equal(np.asarray(ours_raw, np.float32), ref_raw)


def test_key_table_matches_diffusers_state_dict(state):
    table = vae_key_table(TINY)
    assert [e.torch_key for e in table] == list(state)
    assert all(e.torch_shape == state[e.torch_key].shape for e in table)


def test_key_table_for_cosmos3_counts_the_published_parameters():
    table = vae_key_table(WanVAEConfig.from_dict(COSMOS3_JSON))
    sizes = {e.torch_key: int(np.prod(e.torch_shape)) for e in table}
    assert len(table) == 196
    assert sum(sizes.values()) == 704_688_668
    assert sum(v for k, v in sizes.items() if k.startswith(("encoder.", "quant_conv."))) == 149_637_088
    shapes = {e.torch_key: e.torch_shape for e in table}
    assert shapes["encoder.down_blocks.1.downsampler.time_conv.weight"] == (320, 320, 3, 1, 1)
    assert shapes["decoder.up_blocks.0.upsampler.time_conv.weight"] == (2048, 1024, 3, 1, 1)


def test_params_tree_matches_flax_init(params):
    shapes = jax.eval_shape(lambda: init_params(TINY, jax.random.PRNGKey(0)))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert jax.tree.leaves(jax.tree.map(lambda s, p: s.shape == p.shape, shapes, params)) == [True] * len(
        jax.tree.leaves(params)
    )


@pytest.mark.parametrize("np_dtype", [np.float32, ml_dtypes.bfloat16])
def test_key_map_round_trip_is_byte_identical(state, np_dtype):
    cast = {k: v.astype(np_dtype) for k, v in state.items()}
    back = vae_state_from_params(vae_params_from_torch_state(cast, TINY), TINY)
    assert list(back) == list(cast)
    for key, value in cast.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key


def test_key_map_reports_every_problem_at_once(state, params):
    broken = dict(state)
    del broken["encoder.conv_in.bias"]
    broken["encoder.extra.weight"] = np.zeros(3, np.float32)
    broken["decoder.norm_out.gamma"] = np.ones((5, 1, 1, 1), np.float32)
    with pytest.raises(ValueError) as info:
        vae_params_from_torch_state(broken, TINY)
    message = str(info.value)
    assert "encoder.conv_in.bias" in message and "encoder.extra.weight" in message
    assert "decoder.norm_out.gamma: expected (24, 1, 1, 1), got (5, 1, 1, 1)" in message
    trimmed = {k: v for k, v in params.items() if k != "post_quant_conv"}
    with pytest.raises(ValueError, match="missing.*post_quant_conv/kernel"):
        vae_state_from_params(trimmed, TINY)


def test_config_round_trips_the_published_json():
    config = WanVAEConfig.from_dict(COSMOS3_JSON)
    assert config == WanVAEConfig()
    assert config.to_dict() == COSMOS3_JSON
    assert config.spatial_compression == 16
    assert config.decoder_dims == (1024, 1024, 1024, 512, 256)
    assert config.encoder_dims == (160, 160, 320, 640, 640)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"is_residual": False}, "is_residual"),
        ({"latents_std": [1.0] * 47}, "latents_std must hold 48"),
        ({"temperal_downsample": [False, True]}, "temperal_downsample needs 3"),
        ({"temperal_downsample": [True, True, True]}, "exactly twice"),
        ({"in_channels": 3}, "3·patch_size²"),
        ({"scale_factor_spatial": 8}, "scale_factor_spatial 8 disagrees"),
        ({"base_dim": 0}, "base_dim must be a positive int"),
    ],
)
def test_config_rejects_unsupported_values(change, message):
    with pytest.raises(ValueError, match=message):
        WanVAEConfig.from_dict({**COSMOS3_JSON, **change})


def test_config_requires_every_modelled_key():
    with pytest.raises(ValueError, match="lacks keys.*z_dim"):
        WanVAEConfig.from_dict({k: v for k, v in COSMOS3_JSON.items() if k != "z_dim"})


@pytest.mark.parametrize(
    ("shape", "fill", "message"),
    [
        ((1, 4, 5, 32, 32), 0.0, "3 channels"),
        ((1, 3, 6, 32, 32), 0.0, "1 \\+ 4k, got 6"),
        ((1, 3, 5, 40, 32), 0.0, "multiples of 16, got 40x32"),
        ((1, 3, 5, 32), 0.0, "\\[B,3,F,H,W\\]"),
        ((1, 3, 5, 32, 32), np.nan, "NaN or Inf"),
    ],
)
def test_encode_rejects_bad_video(params, shape, fill, message):
    with pytest.raises(ValueError, match=message):
        encode(params, np.full(shape, fill, np.float32), TINY)


@pytest.mark.parametrize(
    ("shape", "fill", "message"),
    [((1, 16, 2, 2, 2), 0.0, "48 channels"), ((1, 48, 0, 2, 2), 0.0, "at least one"),
     ((1, 48, 2, 2, 2), np.inf, "NaN or Inf")],
)
def test_decode_rejects_bad_latents(params, shape, fill, message):
    with pytest.raises(ValueError, match=message):
        decode(params, np.full(shape, fill, np.float32), TINY)


def test_decode_scratch_memory_does_not_grow_with_frames():
    """At 32x48 px XLA plans the same scratch for 3 and 9 latent frames (the chunk step's activations are reused
    across the scan, the caches and the output buffer are donated into it); only the output buffer grows."""
    short = decode_memory_plan(TINY, (1, 48, 3, HEIGHT // 16, WIDTH // 16))
    long = decode_memory_plan(TINY, (1, 48, 9, HEIGHT // 16, WIDTH // 16))
    assert long["temp_bytes"] == short["temp_bytes"] > 0
    assert long["cache_bytes"] == short["cache_bytes"] > 0
    assert short["output_bytes"] == 3 * 9 * HEIGHT * WIDTH * 4
    assert long["output_bytes"] == 3 * 33 * HEIGHT * WIDTH * 4


@pytest.mark.slow
def test_bf16_matches_diffusers_bf16_within_its_own_rounding_spread(torch_vae, state):
    """bf16 weights and activations against the reference run in bf16: our error stays within twice the
    reference's own bf16-vs-fp32 spread (measured ≈4e-3 encode / ≈2e-2 decode on 5 frames, both ways)."""
    video = torch.rand(1, 3, 1, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(5)).bfloat16() * 2 - 1
    z = torch.randn(1, 48, 1, HEIGHT // 16, WIDTH // 16, generator=torch.Generator().manual_seed(6)).bfloat16()
    reference_bf16 = AutoencoderKLWan(**TINY.to_dict()).eval()
    reference_bf16.load_state_dict(torch_vae.state_dict())
    reference_bf16 = reference_bf16.to(torch.bfloat16)
    with torch.no_grad():
        ref32 = (torch_vae.encode(video.float()).latent_dist.mode(), torch_vae.decode(z.float()).sample)
        ref16 = (reference_bf16.encode(video).latent_dist.mode().float(), reference_bf16.decode(z).sample.float())
    params16 = vae_params_from_torch_state({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, TINY)
    ours = (encode(params16, video.float().numpy().astype(ml_dtypes.bfloat16), TINY, jnp.bfloat16),
            decode(params16, z.float().numpy(), TINY, jnp.bfloat16))
    for mine, r16, r32 in zip(ours, ref16, ref32):
        assert mine.dtype == jnp.bfloat16
        spread = float((r16 - r32).abs().max())
        err = float(np.abs(np.asarray(mine, np.float32) - r16.numpy()).max())
        assert 0 < spread and err <= 2 * spread, f"bf16 err {err:.2e} vs reference spread {spread:.2e}"

"""Wan VAE spatial tiling: fp32 parity with diffusers `AutoencoderKLWan.tiled_decode` and `tiled_encode`
(`enable_tiling`), the blending algebra on a position-exact stand-in decoder, and tiling validation.

The reference is a tiny random Cosmos 3-shaped VAE (z_dim 48, patch 2, base_dim 16, decoder_base_dim 24) with every
norm gamma and bias perturbed, decoding 2 latent frames of 5x6 latents (80x96 px) in tiles of a few latent pixels
(one case: every JAX tile shape compiles its own program). Measured on CPU, fp32: max abs error ≈1.8e-6 against
the reference's own tiled output of magnitude 1, while tiled and untiled reference outputs differ by ≈0.7 (so a
decode that ignored the tiling would fail); encode ≈4e-7 at magnitude 0.45 (tiled vs untiled ≈0.11). Both
asserted ≤ 1e-4 × max |reference|.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from hypothesis import given
from hypothesis import strategies as st
from test_wan_vae import REL_TOL, TINY, torch_vae  # noqa: F401 (the shared tiny reference VAE fixture)

from cosmos_jax.convert.keymap_vae import vae_params_from_torch_state
from cosmos_jax.modeling.wan_vae import WanVAE, decode
from cosmos_jax.modeling.wan_vae_tiling import VAETiling, blend_edge, tiled_decode, tiling_applies

LATENT_SHAPE = (1, 48, 2, 5, 6)


@pytest.fixture(scope="module")
def params(torch_vae: AutoencoderKLWan) -> dict:
    return vae_params_from_torch_state({k: v.numpy() for k, v in torch_vae.state_dict().items()}, TINY)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(*LATENT_SHAPE, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def untiled_reference(torch_vae: AutoencoderKLWan, latents: torch.Tensor) -> np.ndarray:
    torch_vae.disable_tiling()
    with torch.no_grad():
        return torch_vae.decode(latents).sample.numpy()


def _assert_tiled_parity(what: str, ours: np.ndarray, ref: np.ndarray, untiled: np.ndarray) -> None:
    """ours within REL_TOL·max|ref| of the reference's tiled output, which itself differs from its untiled output
    by over 100× that (so an implementation that ignored the tiling would fail)."""
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    seam = float(np.abs(ref - untiled).max())
    print(f"tiled {what}: max abs err {err:.2e}, tiled vs untiled {seam:.2e}, scale {scale:.2f}")
    assert seam > 100 * REL_TOL * scale, f"tiling changes the reference {what} output by only {seam:.2e}"
    assert err <= REL_TOL * scale, f"tiled {what}: max abs err {err:.2e} at scale {scale:.2f}"


def test_tiled_decode_matches_diffusers(torch_vae, params, latents, untiled_reference):
    """Tiles of 3x5 latents every 2x3 (8 and 16 px blends in patch space), edge tiles 1 latent tall."""
    tiling = VAETiling(tile_height=48, tile_width=80, stride_height=32, stride_width=48)
    torch_vae.enable_tiling(tile_sample_min_height=tiling.tile_height, tile_sample_min_width=tiling.tile_width,
                            tile_sample_stride_height=tiling.stride_height,
                            tile_sample_stride_width=tiling.stride_width)
    try:
        with torch.no_grad():
            ref = torch_vae.decode(latents).sample.numpy()
    finally:
        torch_vae.disable_tiling()
    ours = np.asarray(WanVAE(TINY, tiling=tiling).decode(params, latents.numpy()))
    assert ours.shape == ref.shape == (1, 3, 5, 80, 96)
    _assert_tiled_parity("decode", ours, ref, untiled_reference)


def test_tiled_encode_matches_diffusers(torch_vae, params):
    """Two 80-px-wide tiles every 48 px (32 px = 2 latent blend) over a 32x96 px, 5-frame video. diffusers reads
    encode tile sizes in patchified pixels, so its `enable_tiling(16, 40, 16, 24)` is our VAETiling(32, 80, 32, 48)."""
    video = torch.rand(1, 3, 5, 32, 96, generator=torch.Generator().manual_seed(12)) * 2 - 1
    with torch.no_grad():
        untiled = torch_vae.encode(video).latent_dist.mode().numpy()
        torch_vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=40, tile_sample_stride_height=16,
                                tile_sample_stride_width=24)
        try:
            ref = torch_vae.encode(video).latent_dist.mode().numpy()
        finally:
            torch_vae.disable_tiling()
    ours = np.asarray(WanVAE(TINY, tiling=VAETiling(32, 80, 32, 48)).encode(params, video.numpy()))
    assert ours.shape == ref.shape == (1, 48, 2, 2, 6)
    _assert_tiled_parity("encode", ours, ref, untiled)


def test_tiling_applies_only_beyond_one_tile():
    tiling = VAETiling(tile_height=64, tile_width=96, stride_height=48, stride_width=48)
    assert not tiling_applies(tiling, (4, 6), 16)
    assert tiling_applies(tiling, (5, 6), 16)
    assert tiling_applies(tiling, (4, 7), 16)


def _pointwise_decoder(z: jnp.ndarray) -> jnp.ndarray:
    """A stand-in decoder whose output at a pixel depends only on the latent under it: `[B,z,T,h,w]` ->
    `[B,T,2h,2w,z]` (every latent pixel repeated 2x2)."""
    frames = jnp.transpose(jnp.asarray(z), (0, 2, 3, 4, 1))
    return jnp.repeat(jnp.repeat(frames, 2, axis=2), 2, axis=3)


@given(
    height=st.integers(1, 9), width=st.integers(1, 9), tile=st.integers(1, 4), overlap=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_blending_agreeing_tiles_reproduces_the_untiled_output(height, width, tile, overlap, seed):
    """Tiles that agree on their overlaps blend back to the untiled output (weights sum to 1, no seams, no gaps),
    for any tile/stride/frame size, edge tiles of 1 latent pixel included."""
    stride = max(1, tile - overlap)
    z = np.random.default_rng(seed).standard_normal((1, 3, 2, height, width)).astype(np.float32)
    tiling = VAETiling(16 * tile, 16 * tile, 16 * stride, 16 * stride)
    out = tiled_decode(_pointwise_decoder, z, tiling, compression=16, patch=8)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_pointwise_decoder(z)), rtol=1e-6, atol=1e-6)


def test_blend_edge_ramps_linearly_from_the_previous_tile():
    previous = jnp.full((1, 1, 6, 2, 1), 10.0)
    tile = jnp.zeros((1, 1, 5, 2, 1))
    out = np.asarray(blend_edge(previous, tile, 4, axis=2))[0, 0, :, 0, 0]
    np.testing.assert_allclose(out, [10.0, 7.5, 5.0, 2.5, 0.0], rtol=0, atol=1e-6)
    narrow = np.asarray(blend_edge(previous, tile[:, :, :2], 4, axis=2))[0, 0, :, 0, 0]
    np.testing.assert_allclose(narrow, [10.0, 5.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tile_height": 0}, "tile_height must be a positive int"),
     ({"stride_width": 300}, "stride_width 300 exceeds tile_width 256"),
     ({"tile_width": 64.0}, "tile_width must be a positive int")],
)
def test_tiling_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAETiling(**kwargs)


def test_decode_rejects_tiles_that_are_not_whole_latent_pixels(params):
    with pytest.raises(ValueError, match="multiples of the spatial compression 16.*'stride_height': 40"):
        decode(params, np.zeros((1, 48, 1, 5, 6), np.float32), TINY, tiling=VAETiling(64, 64, 40, 48))

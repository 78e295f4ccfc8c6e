"""The Wan 2.2 VAE (diffusers `AutoencoderKLWan`, residual layout) as used by Cosmos 3.

Public entry points work on the reference's channels-first layout:

    encode(params, video [B,3,F,H,W] in [-1,1], config, tiling=None) -> mean [B,z,T,H/16,W/16], F = 1 + 4(T-1)
    decode(params, z [B,z,T,h,w], config, tiling=None) -> video [B,3,1+4(T-1),16h,16w] clamped to [-1,1]

Both reproduce the reference's chunked causal streaming: the encoder sees frame 0 alone, then chunks of 4 frames;
the decoder sees one latent frame at a time. The chunks after the first run in one `jax.lax.scan` that carries the
per-layer time caches (and, for decode, the output buffer) in donated buffers, so memory stays flat in the frame
count (beyond the input and output buffers) and the chunk step compiles once. Optional spatial tiling
(`VAETiling`, off by default as in the reference) bounds memory by the tile area for large frames.

`params` is this model's own tree (`{"encoder", "quant_conv", "post_quant_conv", "decoder"}`); see
`cosmos_jax.convert.keymap_vae` for loading diffusers weights into it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax import aot
from cosmos_jax.modeling.wan_vae_blocks import Decoder, Encoder, PointwiseConv, round_to
from cosmos_jax.modeling.wan_vae_tiling import VAETiling, check_tiling, tiled_decode, tiled_encode, tiling_applies

RGB_CHANNELS = 3
FRAMES_PER_LATENT = 4  # temporal compression; also the length of the reference's encoder chunks

# The published Cosmos 3 / Wan 2.2 TI2V-5B latent statistics (48 channels).
COSMOS3_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
COSMOS3_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

_TUPLE_KEYS = ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """`vae/config.json` of a diffusers `AutoencoderKLWan`, keys spelled as diffusers spells them.

    Defaults are the Cosmos 3 VAE. Keys this class does not model (`_class_name`, `clip_output`, ...) are kept in
    `extra` and written back unchanged; they do not take part in equality or hashing.
    """

    base_dim: int = 160
    decoder_base_dim: int | None = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = COSMOS3_LATENTS_MEAN
    latents_std: tuple[float, ...] = COSMOS3_LATENTS_STD
    is_residual: bool = True
    in_channels: int = 12
    out_channels: int = 12
    patch_size: int | None = 2
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 16
    extra: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), compare=False, hash=False
    )

    def __post_init__(self) -> None:
        for key in _TUPLE_KEYS:
            object.__setattr__(self, key, tuple(getattr(self, key)))
        object.__setattr__(self, "extra", types.MappingProxyType(dict(self.extra)))
        problems = _config_problems(self)
        if problems:
            raise ValueError("invalid WanVAEConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WanVAEConfig:
        """Build from a parsed `vae/config.json`; every modelled key must be present."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"VAE config lacks keys {missing}")
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**{n: data[n] for n in names}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict: modelled keys (tuples as lists) plus the unmodelled ones as read."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = list(value) if f.name in _TUPLE_KEYS else value
        return out

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def encoder_dims(self) -> tuple[int, ...]:
        return tuple(self.base_dim * m for m in (1, *self.dim_mult))

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        dim = self.decoder_base_dim or self.base_dim
        return tuple(dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1]))

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along H and W (patchify times the 2x spatial stages)."""
        return self.patch * 2 ** (len(self.dim_mult) - 1)


def _config_problems(c: WanVAEConfig) -> list[str]:
    """Every reason `c` is not a Wan 2.2-layout VAE this module can run (empty when valid)."""
    problems = []
    positive = {"base_dim": c.base_dim, "z_dim": c.z_dim, "num_res_blocks": c.num_res_blocks}
    if c.decoder_base_dim is not None:
        positive["decoder_base_dim"] = c.decoder_base_dim
    problems += [f"{k} must be a positive int, got {v!r}" for k, v in positive.items()
                 if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if problems:
        return problems
    if not c.dim_mult or any(not isinstance(m, int) or m <= 0 for m in c.dim_mult):
        return problems + [f"dim_mult must be non-empty positive ints, got {c.dim_mult}"]
    if len(c.temperal_downsample) != len(c.dim_mult) - 1:
        problems.append(f"temperal_downsample needs {len(c.dim_mult) - 1} entries, got {c.temperal_downsample}")
    elif sum(bool(t) for t in c.temperal_downsample) != 2:
        problems.append(f"temperal_downsample must downsample time exactly twice (4x), got {c.temperal_downsample}")
    if not c.is_residual:
        problems.append("is_residual=False (the Wan 2.1 layout) is not supported; Cosmos 3 uses is_residual=True")
    if c.patch_size is not None and (not isinstance(c.patch_size, int) or c.patch_size <= 0):
        problems.append(f"patch_size must be a positive int or None, got {c.patch_size!r}")
    elif c.in_channels != RGB_CHANNELS * c.patch**2 or c.out_channels != RGB_CHANNELS * c.patch**2:
        problems.append(f"in/out_channels must be 3·patch_size² = {RGB_CHANNELS * c.patch**2}, "
                        f"got {c.in_channels}/{c.out_channels}")
    for key in ("latents_mean", "latents_std"):
        values = np.asarray(getattr(c, key), np.float64)
        if values.shape != (c.z_dim,) or not np.isfinite(values).all():
            problems.append(f"{key} must hold {c.z_dim} finite numbers, got {values.shape[0]}")
    if np.any(np.asarray(c.latents_std, np.float64) <= 0):
        problems.append("latents_std must be positive")
    if not 0.0 <= c.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {c.dropout}")
    if c.scale_factor_temporal not in (None, FRAMES_PER_LATENT):
        problems.append(f"scale_factor_temporal must be {FRAMES_PER_LATENT}, got {c.scale_factor_temporal}")
    if not problems and c.scale_factor_spatial not in (None, c.spatial_compression):
        problems.append(f"scale_factor_spatial {c.scale_factor_spatial} disagrees with the layout "
                        f"(patch {c.patch} x 2^{len(c.dim_mult) - 1} = {c.spatial_compression})")
    if not problems:
        problems += _shortcut_problems(c)
    return problems


def _shortcut_problems(c: WanVAEConfig) -> list[str]:
    """The parameter-free AvgDown3D/DupUp3D shortcuts need whole channel groups."""
    problems = []
    enc, dec, stages = c.encoder_dims, c.decoder_dims, len(c.dim_mult) - 1
    for i in range(stages):
        factor = (2 if c.temperal_downsample[i] else 1) * 4
        if enc[i] * factor % enc[i + 1]:
            problems.append(f"encoder stage {i}: {enc[i]}·{factor} channels do not group into {enc[i + 1]}")
        factor = (2 if c.temporal_upsample[i] else 1) * 4
        if dec[i + 1] * factor % dec[i]:
            problems.append(f"decoder stage {i}: {dec[i + 1]}·{factor} channels are not a multiple of {dec[i]}")
    return problems


class WanVAEModel(nn.Module):
    """The parameter tree and the two chunk steps. Channels-last, patchified; see `encode`/`decode` for use."""

    config: WanVAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(c.encoder_dims, 2 * c.z_dim, c.num_res_blocks, c.temperal_downsample, **kw)
        self.quant_conv = PointwiseConv(2 * c.z_dim, **kw)
        self.post_quant_conv = PointwiseConv(c.z_dim, **kw)
        self.decoder = Decoder(c.decoder_dims, c.out_channels, c.num_res_blocks, c.temporal_upsample, **kw)

    def encode_chunk(self, x: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """`[B,T,H,W,in]` (T=1 first, else 4) -> (posterior mean `[B,1,H/8,W/8,z]`, cache)."""
        h, cache = self.encoder(x, cache)
        return self.quant_conv(h)[..., : self.config.z_dim], cache

    def decode_chunk(self, z: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """`[B,1,h,w,z]` -> (`[B,T,8h,8w,out]` with T=1 first, else 4, cache)."""
        return self.decoder(self.post_quant_conv(z), cache)

    def initialize(self, video: jax.Array, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Run a first and a second chunk of each path so that every parameter is created."""
        mean, cache = self.encode_chunk(video[:, :1], None)
        mean, _ = self.encode_chunk(video[:, 1:], cache)
        frames, cache = self.decode_chunk(latents, None)
        frames, _ = self.decode_chunk(latents, cache)
        return mean, frames


def patchify(x: jax.Array, patch: int) -> jax.Array:
    """`[B,F,H,W,C] -> [B,F,H/p,W/p,C·p·p]`, channel index `c·p² + pw·p + ph` (reference order)."""
    b, f, h, w, c = x.shape
    x = x.reshape(b, f, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 2, 4, 6, 5, 3).reshape(b, f, h // patch, w // patch, c * patch * patch)


def unpatchify(x: jax.Array, patch: int) -> jax.Array:
    """Inverse of `patchify`: `[B,F,h,w,C·p·p] -> [B,F,h·p,w·p,C]`."""
    b, f, h, w, cp = x.shape
    c = cp // (patch * patch)
    x = x.reshape(b, f, h, w, c, patch, patch)  # [..., c, pw, ph]
    return x.transpose(0, 1, 2, 6, 3, 5, 4).reshape(b, f, h * patch, w * patch, c)


def _step(params: Any, config: WanVAEConfig, dtype: Any, method: Any) -> Any:
    model = WanVAEModel(config, dtype=dtype)
    return functools.partial(model.apply, {"params": params}, method=method)


def _to_patches(video: jax.Array, config: WanVAEConfig, dtype: Any) -> jax.Array:
    """`[B,3,F,H,W] -> [B,F,H/p,W/p,3p²]` in `dtype`."""
    return patchify(jnp.transpose(video, (0, 2, 3, 4, 1)).astype(dtype), config.patch)


def _from_patches(frames: jax.Array, config: WanVAEConfig) -> jax.Array:
    """`[B,F,h,w,3p²] -> [B,3,F,h·p,w·p]` clamped to [-1,1]."""
    return jnp.transpose(jnp.clip(unpatchify(frames, config.patch), -1.0, 1.0), (0, 4, 1, 2, 3))


# The first chunk and the scan over the remaining chunks are compiled separately, so that videos of different
# lengths share the first chunk's program. The scans take their carried state (the per-layer time caches and, for
# decode, the output buffer) as donated arguments and return it, so XLA can run the loop in the caller's buffers
# instead of copying them into loop buffers of its own (decode at 704x1280: 13.2 -> 10.1 GiB of scratch).
@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _encode_first(params: Any, video: jax.Array, config: WanVAEConfig, dtype: Any) -> tuple[jax.Array, Any]:
    """Frame 0 `[B,3,1,H,W]` -> (mean `[B,z,1,h,w]`, cache)."""
    mean, cache = _step(params, config, dtype, WanVAEModel.encode_chunk)(_to_patches(video, config, dtype), None)
    return jnp.transpose(mean, (0, 4, 1, 2, 3)), cache


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def _encode_rest(params: Any, cache: Any, video: jax.Array, config: WanVAEConfig,
                 dtype: Any) -> tuple[jax.Array, Any]:
    """Whole video `[B,3,1+4K,H,W]`, first chunk's cache (donated) -> (mean of frames 1.. `[B,z,K,h,w]`, cache).

    Each scan step slices and patchifies its own 4 frames, so the input is never copied whole.
    """
    step = _step(params, config, dtype, WanVAEModel.encode_chunk)

    def body(carry: Any, index: jax.Array) -> tuple[Any, jax.Array]:
        chunk = jax.lax.dynamic_slice_in_dim(video, 1 + FRAMES_PER_LATENT * index, FRAMES_PER_LATENT, axis=2)
        mean, carry = step(_to_patches(chunk, config, dtype), carry)
        return carry, mean[:, 0]

    chunks = (video.shape[2] - 1) // FRAMES_PER_LATENT
    cache, means = jax.lax.scan(body, cache, jnp.arange(chunks))  # means [K,B,h,w,z]
    return jnp.transpose(means, (1, 4, 0, 2, 3)), cache


def _frames_out(frames: jax.Array, config: WanVAEConfig, pixels: bool) -> jax.Array:
    """Decoder output `[B,T,h,w,3p²]` as video `[B,3,T,H,W]` clamped (pixels) or unchanged (patch space)."""
    return _from_patches(frames, config) if pixels else frames


@functools.partial(jax.jit, static_argnames=("config", "dtype", "pixels"))
def _decode_first(params: Any, z: jax.Array, config: WanVAEConfig, dtype: Any,
                  pixels: bool) -> tuple[jax.Array, Any]:
    """Latent frame 0 `[B,z,1,h,w]` -> (frame 0 in the `_frames_out` layout, cache)."""
    frames, cache = _step(params, config, dtype, WanVAEModel.decode_chunk)(
        jnp.transpose(z, (0, 2, 3, 4, 1)).astype(dtype), None
    )
    return _frames_out(frames, config, pixels), cache


@functools.partial(jax.jit, static_argnames=("config", "dtype", "pixels"), donate_argnames=("cache", "video"))
def _decode_rest(params: Any, cache: Any, video: jax.Array, z: jax.Array, config: WanVAEConfig, dtype: Any,
                 pixels: bool) -> tuple[jax.Array, Any]:
    """Frame 0's cache and the output buffer (both donated), latent frames 1.. `[B,z,K,h,w]` -> (video, cache).

    `video` is `[B,3,1+4K,H,W]` (pixels) or `[B,1+4K,h,w,3p²]` (patch space) with frame 0 already in place; each
    scan step writes its 4 frames into it. Per-chunk activations do not grow with the frame count.
    """
    step = _step(params, config, dtype, WanVAEModel.decode_chunk)
    time_axis = 2 if pixels else 1

    def body(carry: tuple[Any, jax.Array], index: jax.Array) -> tuple[tuple[Any, jax.Array], None]:
        cache, video = carry
        latent = jnp.transpose(jax.lax.dynamic_slice_in_dim(z, index, 1, axis=2), (0, 2, 3, 4, 1)).astype(dtype)
        frames, cache = step(latent, cache)
        start = 1 + FRAMES_PER_LATENT * index
        video = jax.lax.dynamic_update_slice_in_dim(video, _frames_out(frames, config, pixels), start, time_axis)
        return (cache, video), None

    cache, video = jax.lax.scan(body, (cache, video), jnp.arange(z.shape[2]))[0]
    return video, cache


def _decode_stream(params: Any, z: jax.Array, config: WanVAEConfig, dtype: Any, pixels: bool) -> jax.Array:
    """Latents `[B,z,T,h,w]` -> every frame, decoded one latent frame at a time (layout as `_frames_out`)."""
    first, cache = aot.call(f"VAE decode, first latent frame {_shape(z[:, :, :1])}", _decode_first, params,
                            z[:, :, :1], config, dtype, pixels)
    chunks = z.shape[2] - 1
    if chunks == 0:
        return first
    time_axis = 2 if pixels else 1
    pad = [(0, 0)] * first.ndim
    pad[time_axis] = (0, FRAMES_PER_LATENT * chunks)
    return aot.call(f"VAE decode, latent frames 1.. {_shape(z[:, :, 1:])}", _decode_rest, params, cache,
                    jnp.pad(first, pad), z[:, :, 1:], config, dtype, pixels)[0]


def _shape(x: jax.Array) -> str:
    """`[1, 3, 5, 64, 64] float32`: an array's shape and dtype, for the compile record (cosmos_jax.aot)."""
    return f"{list(x.shape)} {x.dtype}"


def _check_finite(x: Any, what: str) -> None:
    if isinstance(x, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(x)))):
        raise ValueError(f"{what} contains NaN or Inf values")


def validate_video(video: Any, config: WanVAEConfig) -> None:
    """Raise ValueError unless `video` is `[B,3,1+4k,H,W]`, H and W multiples of 16, all finite."""
    shape = tuple(video.shape)
    if len(shape) != 5:
        raise ValueError(f"video must be [B,3,F,H,W], got shape {shape}")
    _, channels, frames, height, width = shape
    if channels != RGB_CHANNELS:
        raise ValueError(f"video must have {RGB_CHANNELS} channels (dim 1), got {channels} (shape {shape})")
    if frames < 1 or (frames - 1) % FRAMES_PER_LATENT:
        raise ValueError(f"video frame count must be 1 + 4k, got {frames}")
    s = config.spatial_compression
    if height % s or width % s or height == 0 or width == 0:
        raise ValueError(f"video height and width must be positive multiples of {s}, got {height}x{width}")
    _check_finite(video, "video")


def validate_latents(z: Any, config: WanVAEConfig) -> None:
    """Raise ValueError unless `z` is `[B,z_dim,T,h,w]` with T, h, w ≥ 1, all finite."""
    shape = tuple(z.shape)
    if len(shape) != 5:
        raise ValueError(f"latents must be [B,{config.z_dim},T,h,w], got shape {shape}")
    if shape[1] != config.z_dim:
        raise ValueError(f"latents must have {config.z_dim} channels (dim 1), got {shape[1]} (shape {shape})")
    if min(shape[2:]) < 1:
        raise ValueError(f"latents need at least one frame and pixel, got shape {shape}")
    _check_finite(z, "latents")


def _encode_stream(params: Any, video: jax.Array, config: WanVAEConfig, dtype: Any) -> jax.Array:
    """Video `[B,3,1+4k,H,W]` -> posterior mean `[B,z,1+k,h,w]`, frame 0 alone, then chunks of 4 frames."""
    mean, cache = aot.call(f"VAE encode, first frame {_shape(video[:, :, :1])}", _encode_first, params,
                           video[:, :, :1], config, dtype)
    if video.shape[2] == 1:
        return mean
    rest = aot.call(f"VAE encode, frames 1.. of {_shape(video)}", _encode_rest, params, cache, video, config, dtype)
    return jnp.concatenate([mean, rest[0]], axis=2)


def encode(params: Any, video: Any, config: WanVAEConfig, dtype: Any = jnp.float32,
           tiling: VAETiling | None = None) -> jax.Array:
    """Posterior mean: video `[B,3,F,H,W]` in [-1,1], F = 1+4k -> `[B,z_dim,1+k,H/16,W/16]` in `dtype`.

    With `tiling`, videos larger than one tile are encoded in overlapping spatial tiles (see `wan_vae_tiling`).
    """
    validate_video(video, config)
    dtype = jnp.dtype(dtype)
    s = config.spatial_compression
    if tiling is not None:
        check_tiling(tiling, s)
    if tiling is None or not tiling_applies(tiling, (video.shape[3] // s, video.shape[4] // s), s):
        return _encode_stream(params, video, config, dtype)

    def encode_tile(tile: jax.Array) -> jax.Array:
        return jnp.transpose(_encode_stream(params, tile, config, dtype), (0, 2, 3, 4, 1))

    return jnp.transpose(tiled_encode(encode_tile, video, tiling, s), (0, 4, 1, 2, 3))


_pixels_from_patches = jax.jit(_from_patches, static_argnames=("config",))


def decode(params: Any, z: Any, config: WanVAEConfig, dtype: Any = jnp.float32,
           tiling: VAETiling | None = None) -> jax.Array:
    """Latents `[B,z_dim,T,h,w]` -> video `[B,3,1+4(T-1),16h,16w]` clamped to [-1,1], in `dtype`.

    With `tiling`, latents larger than one tile are decoded in overlapping spatial tiles (see `wan_vae_tiling`).
    """
    validate_latents(z, config)
    dtype = jnp.dtype(dtype)
    compression = config.spatial_compression
    if tiling is not None:
        check_tiling(tiling, compression)
    if tiling is None or not tiling_applies(tiling, tuple(z.shape[3:]), compression):
        return _decode_stream(params, z, config, dtype, pixels=True)
    frames = tiled_decode(lambda tile: _decode_stream(params, tile, config, dtype, pixels=False), z, tiling,
                          compression, config.patch)
    return aot.call(f"VAE tiles to pixels {_shape(frames)}", _pixels_from_patches, frames, config)


def init_params(config: WanVAEConfig, rng: jax.Array, param_dtype: Any = jnp.float32) -> Any:
    """Random parameters with the tree `encode`/`decode` expect."""
    s, p = config.spatial_compression, config.patch
    video = jnp.zeros((1, 1 + FRAMES_PER_LATENT, s // p, s // p, config.in_channels), param_dtype)
    latents = jnp.zeros((1, 1, 1, 1, config.z_dim), param_dtype)
    model = WanVAEModel(config, dtype=param_dtype, param_dtype=param_dtype)
    return model.init(rng, video, latents, method=WanVAEModel.initialize)["params"]


def decode_memory_plan(config: WanVAEConfig, latent_shape: tuple[int, ...], dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32, tiling: VAETiling | None = None) -> dict[str, int]:
    """Bytes XLA plans for `decode` of latents `[B,z,T,h,w]` on the default backend, without weights or data.

    Returns `output_bytes` (the video), `param_bytes`, `cache_bytes` (the per-layer time caches carried from one
    latent frame to the next, held in donated buffers), `temp_bytes` (the larger scratch of the first-frame and the
    scanned programs; it does not depend on T once T ≥ 2) and `tile_buffer_bytes`. Untiled, a decode needs about
    the sum. With `tiling` (when it applies), cache and scratch are those of one full tile, and `tile_buffer_bytes`
    bounds the decoded tiles held for blending (two whole tiles and the bottom overlap strips of a row of tiles).
    """
    dtype = jnp.dtype(dtype)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), param_dtype))
    b, c, t, h, w = latent_shape
    plan = {"param_bytes": _nbytes(params), "tile_buffer_bytes": 0,
            "output_bytes": b * RGB_CHANNELS * (1 + FRAMES_PER_LATENT * (t - 1)) * h * w
            * config.spatial_compression**2 * dtype.itemsize}
    s, pixels = config.spatial_compression, True
    if tiling is not None and tiling_applies(tiling, (h, w), s):
        check_tiling(tiling, s)
        columns = -(-w // (tiling.stride_width // s))
        h, w, pixels = min(h, tiling.tile_height // s), min(w, tiling.tile_width // s), False
    first_z = jax.ShapeDtypeStruct((b, c, 1, h, w), jnp.float32)
    first = _decode_first.lower(params, first_z, config, dtype, pixels).compile().memory_analysis()
    frame, cache = jax.eval_shape(functools.partial(_decode_first, config=config, dtype=dtype, pixels=pixels),
                                  params, first_z)
    plan.update(cache_bytes=_nbytes(cache), temp_bytes=first.temp_size_in_bytes)
    frames = 1 + FRAMES_PER_LATENT * (t - 1)
    video = jax.ShapeDtypeStruct((*frame.shape[:2], frames, *frame.shape[3:]) if pixels else
                                 (frame.shape[0], frames, *frame.shape[2:]), frame.dtype)
    if t > 1:
        rest_z = jax.ShapeDtypeStruct((b, c, t - 1, h, w), jnp.float32)
        rest = _decode_rest.lower(params, cache, video, rest_z, config, dtype, pixels).compile().memory_analysis()
        plan["temp_bytes"] = max(plan["temp_bytes"], rest.temp_size_in_bytes)
    if not pixels:
        rows = video.shape[2]
        strip = min(rows, (tiling.tile_height - tiling.stride_height) // config.patch)
        plan["tile_buffer_bytes"] = 2 * _nbytes(video) + _nbytes(video) * columns * strip // rows
    return plan


def _nbytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class WanVAE:
    """Config, compute dtype and optional spatial tiling bundled: `vae.encode(params, v)`, `vae.decode(params, z)`."""

    config: WanVAEConfig = WanVAEConfig()
    dtype: Any = jnp.float32
    tiling: VAETiling | None = None

    def encode(self, params: Any, video: Any) -> jax.Array:
        return encode(params, video, self.config, self.dtype, self.tiling)

    def decode(self, params: Any, z: Any) -> jax.Array:
        return decode(params, z, self.config, self.dtype, self.tiling)

    def normalize(self, mu: jax.Array) -> jax.Array:
        return normalize_latents(mu, self.config.latents_mean, self.config.latents_std, self.dtype)

    def denormalize(self, z: jax.Array) -> jax.Array:
        return denormalize_latents(z, self.config.latents_mean, self.config.latents_std, self.dtype)


def _latent_stats(latents_mean: Sequence[float], latents_std: Sequence[float],
                  dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(mean, 1/std) materialised in `dtype` like the pipeline, returned as f32 `[1,C,1,1,1]`."""
    dtype = jnp.dtype(dtype)
    mean = np.asarray(latents_mean, np.float32).astype(dtype)
    std = np.asarray(latents_std, np.float32).astype(dtype)
    inv_std = round_to(1.0 / jnp.asarray(std, jnp.float32), dtype)
    shape = (1, -1, 1, 1, 1)
    return jnp.asarray(mean, jnp.float32).reshape(shape), inv_std.reshape(shape)


def normalize_latents(mu: jax.Array, latents_mean: Sequence[float], latents_std: Sequence[float],
                      dtype: Any) -> jax.Array:
    """`(mu − mean)·inv_std` in `dtype` (each op rounded to it), `[B,C,T,h,w] -> same`, returned in `dtype`."""
    mean, inv_std = _latent_stats(latents_mean, latents_std, dtype)
    centred = round_to(jnp.asarray(mu).astype(dtype).astype(jnp.float32) - mean, dtype)
    return round_to(centred * inv_std, dtype).astype(dtype)


def denormalize_latents(z: jax.Array, latents_mean: Sequence[float], latents_std: Sequence[float],
                        dtype: Any) -> jax.Array:
    """`z.astype(dtype) / inv_std + mean` in `dtype` (each op rounded to it), `[B,C,T,h,w] -> same`."""
    mean, inv_std = _latent_stats(latents_mean, latents_std, dtype)
    x = jnp.asarray(z).astype(dtype).astype(jnp.float32)
    # XLA rewrites `x / broadcast(d)` as `x * broadcast(1/d)`, which is not the IEEE quotient torch computes.
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(inv_std, x.shape))
    scaled = round_to(x / divisor, dtype)
    return round_to(scaled + mean, dtype).astype(dtype)


def latent_frames(num_frames: int) -> int:
    """Latent frames for a 1+4k-frame video."""
    return 1 + (num_frames - 1) // FRAMES_PER_LATENT

"""Building blocks of the Wan 2.2 VAE, streaming over time chunks.

Layout is channels-last, `[B, T, H, W, C]`. Every module that looks back in time takes the cache its previous
chunk returned and returns its own; `cache=None` means "this is the first chunk of the video", which selects the
reference's first-chunk behaviour (zero history, no temporal resampling, DupUp3D front crop). Caches have fixed
shapes from the first chunk on, so a chunk step can be carried through `jax.lax.scan`.

Cache semantics (reference `feat_cache`): a causal 3x3x3 conv keeps the last `CACHE_FRAMES` frames of its input
(zero frames stand in for missing history, which equals the reference's zero padding); the temporal downsampler
keeps the last spatially downsampled frame; the temporal upsampler keeps the last two frames of its input, and
keeps zeros after the first chunk (the reference's "Rep" sentinel).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CACHE_FRAMES = 2
_NORM_EPS = 1e-12

Cache = Any  # a nested dict of arrays mirroring the module tree, or None on the first chunk


def _sub(cache: Cache, name: str) -> Cache:
    """The child cache `name`, or None on the first chunk."""
    return None if cache is None else cache[name]


def round_to(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Round f32 values to `dtype`'s precision but keep them f32 (a rounding XLA may not fuse away)."""
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], padding: list[tuple[int, int]]) -> jax.Array:
    """N-d convolution, channels-last input and `[*window, I, O]` kernel, accumulated in f32."""
    spatial = "DHW"[3 - (x.ndim - 2) :]
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        preferred_element_type=jnp.float32,
    )


class ChannelRMSNorm(nn.Module):
    """L2-normalise over channels (eps 1e-12, f32 statistics), times sqrt(C)·gamma. `[..., C] -> [..., C]`."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (channels,), self.param_dtype)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        normalized = round_to(xf / jnp.maximum(norm, _NORM_EPS), self.dtype)
        scaled = round_to(normalized * jnp.float32(channels**0.5), self.dtype)
        return (scaled * gamma.astype(self.dtype).astype(jnp.float32)).astype(self.dtype)


class PointwiseConv(nn.Module):
    """1x1(x1) convolution: a dense layer over channels. `[..., I] -> [..., features]`."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype),
                       preferred_element_type=jnp.float32)
        return (y + bias.astype(jnp.float32)).astype(self.dtype)


class CausalConv3d(nn.Module):
    """Causal conv over time (history from the cache), 'same' zero padding in space.

    `x [B,T,H,W,C], cache [B,2,H,W,C] | None -> (y [B,T,H,W,features], new cache [B,2,H,W,C])`.
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        kt, kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kt, kh, kw, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x = x.astype(self.dtype)
        if cache is None:
            cache = jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), self.dtype)
        full = jnp.concatenate([cache, x], axis=1)
        window = full[:, CACHE_FRAMES - (kt - 1) :]
        y = _conv(window, kernel.astype(self.dtype), (1, 1, 1), [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)])
        return (y + bias.astype(jnp.float32)).astype(self.dtype), full[:, -CACHE_FRAMES:]


class FrameConv(nn.Module):
    """3x3 conv applied to every frame: `[B,T,H,W,C] -> [B,T,H',W',features]` with explicit spatial padding."""

    features: int
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = _conv(x.reshape(b * t, h, w, c).astype(self.dtype), kernel.astype(self.dtype), self.strides,
                  list(self.padding))
        y = (y + bias.astype(jnp.float32)).astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class StridedTimeConv(nn.Module):
    """Temporal conv, kernel (3,1,1), stride 2, no padding: `[B,T,H,W,C] -> [B,(T-3)//2+1,H,W,C]`."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 1, 1, c, c), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        y = _conv(x.astype(self.dtype), kernel.astype(self.dtype), (2, 1, 1), [(0, 0), (0, 0), (0, 0)])
        return (y + bias.astype(jnp.float32)).astype(self.dtype)


def avg_down(x: jax.Array, out_channels: int, factor_t: int, factor_s: int) -> jax.Array:
    """Parameter-free shortcut (AvgDown3D): space/time-to-channel then group mean.

    `[B,T,H,W,C] -> [B,ceil(T/ft),H/fs,W/fs,out_channels]`; time is zero-padded at the front to a multiple of ft.
    """
    b, t, h, w, c = x.shape
    pad_t = (factor_t - t % factor_t) % factor_t
    x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    tt, hh, ww = (t + pad_t) // factor_t, h // factor_s, w // factor_s
    x = x.reshape(b, tt, factor_t, hh, factor_s, ww, factor_s, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # [B,T',H',W',C,ft,fs_h,fs_w]
    group = c * factor_t * factor_s * factor_s // out_channels
    x = x.reshape(b, tt, hh, ww, out_channels, group)
    return jnp.mean(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def dup_up(x: jax.Array, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool) -> jax.Array:
    """Parameter-free shortcut (DupUp3D): channel repeat then channel-to-space/time.

    `[B,T,H,W,C] -> [B,T·ft,H·fs,W·fs,out_channels]`; on the first chunk the first ft−1 frames are dropped.
    """
    b, t, h, w, c = x.shape
    repeats = out_channels * factor_t * factor_s * factor_s // c
    x = jnp.repeat(x, repeats, axis=-1)
    x = x.reshape(b, t, h, w, out_channels, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # [B,T,ft,H,fs_h,W,fs_w,C]
    x = x.reshape(b, t * factor_t, h * factor_s, w * factor_s, out_channels)
    return x[:, factor_t - 1 :] if first_chunk else x


class ResidualBlock(nn.Module):
    """`shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`, causal 3x3x3 convs. Cache keys conv1, conv2."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = x if x.shape[-1] == self.features else PointwiseConv(self.features, name="conv_shortcut", **kw)(x)
        h = jax.nn.silu(ChannelRMSNorm(name="norm1", **kw)(x))
        h, cache1 = CausalConv3d(self.features, name="conv1", **kw)(h, _sub(cache, "conv1"))
        h = jax.nn.silu(ChannelRMSNorm(name="norm2", **kw)(h))
        h, cache2 = CausalConv3d(self.features, name="conv2", **kw)(h, _sub(cache, "conv2"))
        return (h + shortcut).astype(self.dtype), {"conv1": cache1, "conv2": cache2}


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, residual. `[B,T,H,W,C] -> same`.

    Einsum letters as in `cosmos_jax.modeling.attention` (n frame, q/s query/key pixel, c channels)."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = PointwiseConv(3 * c, name="to_qkv", **kw)(ChannelRMSNorm(name="norm", **kw)(x))
        qkv = qkv.reshape(b * t, h * w, 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
        logits = jnp.einsum("nqc,nsc->nqs", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("nqs,nsc->nqc", probs, v, preferred_element_type=jnp.float32).astype(self.dtype)
        out = PointwiseConv(c, name="proj", **kw)(out.reshape(b, t, h, w, c))
        return (out + x).astype(self.dtype)


class MidBlock(nn.Module):
    """Residual block, per-frame attention, residual block. Cache keys resnets_0, resnets_1."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, cache0 = ResidualBlock(self.features, name="resnets_0", **kw)(x, _sub(cache, "resnets_0"))
        x = AttentionBlock(name="attentions_0", **kw)(x)
        x, cache1 = ResidualBlock(self.features, name="resnets_1", **kw)(x, _sub(cache, "resnets_1"))
        return x, {"resnets_0": cache0, "resnets_1": cache1}


class Downsample(nn.Module):
    """Spatial ↓2 (pad right/bottom by 1, 3x3 stride-2 conv), then optionally temporal ↓2.

    Temporal: first chunk passes its frames through and caches the last; later chunks prepend the cached frame and
    apply a stride-2 (3,1,1) conv. Cache: `[B,1,H/2,W/2,C]` (temporal only, else an empty dict).
    """

    temporal: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = FrameConv(x.shape[-1], strides=(2, 2), padding=((0, 1), (0, 1)), name="resample", **kw)(x)
        if not self.temporal:
            return x, {}
        last = x[:, -1:]
        if cache is None:
            return x, last
        return StridedTimeConv(name="time_conv", **kw)(jnp.concatenate([cache, x], axis=1)), last


class Upsample(nn.Module):
    """Optionally temporal ↑2 (causal (3,1,1) conv to 2C channels, interleaved), then nearest ↑2 + 3x3 conv.

    First chunk: no temporal upsampling; the cache starts as zeros (the reference's "Rep" sentinel).
    Cache: `[B,2,H,W,C]` (temporal only, else an empty dict).
    """

    features: int
    temporal: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        new_cache: Cache = {}
        b, t, h, w, c = x.shape
        if self.temporal and cache is None:
            new_cache = jnp.zeros((b, CACHE_FRAMES, h, w, c), self.dtype)
        elif self.temporal:
            y, new_cache = CausalConv3d(2 * c, kernel_size=(3, 1, 1), name="time_conv", **kw)(x, cache)
            x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return FrameConv(self.features, name="resample", **kw)(x), new_cache


class DownBlock(nn.Module):
    """Encoder stage: residual blocks, optional Downsample, plus the AvgDown3D shortcut of the block input."""

    features: int
    num_res_blocks: int
    temporal: bool
    down: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = avg_down(x, self.features, 2 if self.temporal else 1, 2 if self.down else 1)
        new_cache = {}
        for j in range(self.num_res_blocks):
            name = f"resnets_{j}"
            x, new_cache[name] = ResidualBlock(self.features, name=name, **kw)(x, _sub(cache, name))
        if self.down:
            x, new_cache["downsampler"] = Downsample(self.temporal, name="downsampler", **kw)(
                x, _sub(cache, "downsampler")
            )
        return (x + shortcut).astype(self.dtype), new_cache


class UpBlock(nn.Module):
    """Decoder stage: residual blocks, optional Upsample, plus the DupUp3D shortcut of the block input."""

    features: int
    num_res_blocks: int
    temporal: bool
    up: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_input = x
        new_cache = {}
        for j in range(self.num_res_blocks + 1):
            name = f"resnets_{j}"
            x, new_cache[name] = ResidualBlock(self.features, name=name, **kw)(x, _sub(cache, name))
        if not self.up:
            return x, new_cache
        x, new_cache["upsampler"] = Upsample(self.features, self.temporal, name="upsampler", **kw)(
            x, _sub(cache, "upsampler")
        )
        shortcut = dup_up(block_input, self.features, 2 if self.temporal else 1, 2, first_chunk=cache is None)
        return (x + shortcut).astype(self.dtype), new_cache


class Encoder(nn.Module):
    """Patchified video chunk `[B,T,H,W,in]` -> `[B,T',H/8,W/8,2·z_dim]` (T' = 1 for T in {1, 4})."""

    dims: tuple[int, ...]  # [base·1, base·m0, base·m1, ...]
    out_channels: int
    num_res_blocks: int
    temporal_down: tuple[bool, ...]  # one per stage that downsamples
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        new_cache = {}
        x, new_cache["conv_in"] = CausalConv3d(self.dims[0], name="conv_in", **kw)(x, _sub(cache, "conv_in"))
        stages = len(self.dims) - 1
        for i in range(stages):
            name, down = f"down_blocks_{i}", i != stages - 1
            block = DownBlock(self.dims[i + 1], self.num_res_blocks, down and self.temporal_down[i], down,
                              name=name, **kw)
            x, new_cache[name] = block(x, _sub(cache, name))
        x, new_cache["mid_block"] = MidBlock(self.dims[-1], name="mid_block", **kw)(x, _sub(cache, "mid_block"))
        x = jax.nn.silu(ChannelRMSNorm(name="norm_out", **kw)(x))
        x, new_cache["conv_out"] = CausalConv3d(self.out_channels, name="conv_out", **kw)(x, _sub(cache, "conv_out"))
        return x, new_cache


class Decoder(nn.Module):
    """One latent frame `[B,1,h,w,z_dim]` -> `[B,T,8h,8w,out]` (T = 1 on the first chunk, else 4)."""

    dims: tuple[int, ...]  # [dec·m[-1], dec·m[-1], dec·m[-2], ...]
    out_channels: int
    num_res_blocks: int
    temporal_up: tuple[bool, ...]  # one per stage that upsamples
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        new_cache = {}
        x, new_cache["conv_in"] = CausalConv3d(self.dims[0], name="conv_in", **kw)(x, _sub(cache, "conv_in"))
        x, new_cache["mid_block"] = MidBlock(self.dims[0], name="mid_block", **kw)(x, _sub(cache, "mid_block"))
        stages = len(self.dims) - 1
        for i in range(stages):
            name, up = f"up_blocks_{i}", i != stages - 1
            block = UpBlock(self.dims[i + 1], self.num_res_blocks, up and self.temporal_up[i], up, name=name, **kw)
            x, new_cache[name] = block(x, _sub(cache, name))
        x = jax.nn.silu(ChannelRMSNorm(name="norm_out", **kw)(x))
        x, new_cache["conv_out"] = CausalConv3d(self.out_channels, name="conv_out", **kw)(x, _sub(cache, "conv_out"))
        return x, new_cache

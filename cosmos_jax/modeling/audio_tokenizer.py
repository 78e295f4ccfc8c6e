"""The Cosmos 3 sound tokenizer (AVAE): 48 kHz stereo waveform <-> 25 Hz, 64-channel latents.

Encoder: per-channel STFT features -> SpecConvNeXt stages -> diagonal-Gaussian moments (mean ‖ scale).
Decoder: Oobleck (SnakeBeta + weight-normed convolutions and transposed convolutions) -> waveform in [-1, 1].

Public layout follows the reference: waveforms and latents are channels-first `[B, C, T]`; internally the
modules run channels-last `[B, T, C]`, the layout XLA convolutions prefer on TPU/GPU.

Weight norm is kept as `(kernel_v, kernel_g)` in the parameter tree and folded (`w = g · v / ||v||`) inside
every call, in float32. Reasons: the reference state dict round-trips byte-identically, fine-tuning keeps the
reference parametrisation, and the fold costs one elementwise pass over the weights, negligible next to the
convolutions it feeds.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax import aot

Array = jax.Array
Params = dict[str, Any]
PrecisionLike = jax.lax.Precision | None

_CLASS_NAME = "Cosmos3AVAEAudioTokenizer"
_PEAK_TARGET = 0.95
_PEAK_EPS = 1e-5
_SNAKE_EPS = 1e-9
_LAYER_NORM_EPS = 1e-5
_POSTERIOR_STD_FLOOR = 1e-4
_PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
_TUPLE_FIELDS = ("dec_c_mults", "dec_strides", "enc_c_mults", "enc_strides")


@dataclasses.dataclass(frozen=True)
class AudioTokenizerConfig:
    """`sound_tokenizer/config.json` of a diffusers Cosmos 3 checkpoint, keys unchanged.

    Only the shipped AVAE variant is supported (as in the reference); anything else raises on construction.
    """

    model_type: str = "autoencoder_v2"
    sampling_rate: int = 48000
    vocoder_input_dim: int = 64
    dec_dim: int = 320
    dec_c_mults: tuple[int, ...] = (1, 2, 4, 8, 16)
    dec_strides: tuple[int, ...] = (2, 4, 5, 6, 8)
    dec_out_channels: int = 2
    stereo: bool = True
    use_wav_as_input: bool = True
    normalize_volume: bool = True
    hop_size: int | None = None
    input_channels: int = 1
    enc_type: str = "spec_convnext"
    enc_dim: int = 192
    enc_intermediate_dim: int = 768
    enc_num_layers: int = 12
    enc_num_blocks: int = 2
    enc_n_fft: int = 64
    enc_hop_length: int = 16
    enc_latent_dim: int = 128
    enc_c_mults: tuple[int, ...] = (1, 2, 4)
    enc_strides: tuple[int, ...] = (4, 5, 6)
    enc_identity_init: bool = False
    enc_use_snake: bool = True
    dec_type: str = "oobleck"
    dec_use_snake: bool = True
    dec_final_tanh: bool = False
    dec_anti_aliasing: bool = False
    dec_use_nearest_upsample: bool = False
    dec_use_tanh_at_final: bool = False
    bottleneck_type: str = "vae"
    bottleneck: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    activation: str = "snakebeta"
    snake_logscale: bool = True
    anti_aliasing: bool = False
    use_cuda_kernel: bool = False
    causal: bool = False
    padding_mode: str = "zeros"
    latent_mean: float | None = dataclasses.field(default=None, hash=False)
    latent_std: float | None = dataclasses.field(default=None, hash=False)
    encoder_enabled: bool = True

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        _validate_supported_variant(self)
        _validate_sizes(self)

    @property
    def hop_length(self) -> int:
        """Waveform samples per latent frame (1920 for the shipped model)."""
        return int(self.hop_size) if self.hop_size is not None else math.prod(self.dec_strides)

    @property
    def latent_channels(self) -> int:
        return self.vocoder_input_dim

    @property
    def encoder_audio_channels(self) -> int:
        """Waveform channels `encode` expects (2 for stereo)."""
        return self.input_channels * (2 if self.stereo else 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AudioTokenizerConfig:
        """Reads a diffusers config dict; `_`-prefixed metadata is ignored, unknown keys are an error."""
        class_name = data.get("_class_name", _CLASS_NAME)
        if class_name != _CLASS_NAME:
            raise ValueError(f"sound tokenizer config has _class_name {class_name!r}, expected {_CLASS_NAME!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"unknown sound tokenizer config keys: {unknown}.")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config dict (tuples written as lists, as `save_config` does)."""
        out: dict[str, Any] = {"_class_name": _CLASS_NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if f.name in _TUPLE_FIELDS else value
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> AudioTokenizerConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
            handle.write("\n")


def _validate_supported_variant(c: AudioTokenizerConfig) -> None:
    unsupported = {
        "model_type": c.model_type != "autoencoder_v2",
        "use_wav_as_input": not c.use_wav_as_input,
        "enc_type": c.enc_type != "spec_convnext",
        "bottleneck_type": c.bottleneck_type != "vae",
        "bottleneck": c.bottleneck is not None and c.bottleneck.get("type", c.bottleneck_type) != "vae",
        "dec_type": c.dec_type != "oobleck",
        "dec_use_snake": not c.dec_use_snake,
        "dec_final_tanh": c.dec_final_tanh,
        "dec_anti_aliasing": c.dec_anti_aliasing,
        "dec_use_nearest_upsample": c.dec_use_nearest_upsample,
        "dec_use_tanh_at_final": c.dec_use_tanh_at_final,
        "activation": c.activation != "snakebeta",
        "snake_logscale": not c.snake_logscale,
        "anti_aliasing": c.anti_aliasing,
        "use_cuda_kernel": c.use_cuda_kernel,
        "latent_mean": c.latent_mean is not None,
        "latent_std": c.latent_std is not None,
        "causal": c.causal and c.encoder_enabled,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise NotImplementedError(
            "only the shipped Cosmos 3 AVAE sound tokenizer is supported; unsupported settings: "
            + ", ".join(f"{name}={getattr(c, name)!r}" for name in bad)
        )
    if c.padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {sorted(_PADDING_MODES)}, got {c.padding_mode!r}.")


def _validate_sizes(c: AudioTokenizerConfig) -> None:
    positive = ("sampling_rate", "vocoder_input_dim", "dec_dim", "dec_out_channels", "input_channels")
    if c.encoder_enabled:
        positive += ("enc_dim", "enc_n_fft", "enc_hop_length", "enc_latent_dim")
    for name in positive:
        if int(getattr(c, name)) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(c, name)}.")
    for name in _TUPLE_FIELDS:
        values = getattr(c, name)
        if not values or min(values) <= 0:
            raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {values}.")
    if len(c.dec_c_mults) != len(c.dec_strides):
        raise ValueError(f"dec_c_mults {c.dec_c_mults} and dec_strides {c.dec_strides} differ in length.")
    if c.hop_length != math.prod(c.dec_strides):
        raise ValueError(f"hop_size {c.hop_size} != prod(dec_strides) = {math.prod(c.dec_strides)}.")
    if not c.encoder_enabled:
        return
    if c.enc_num_blocks < 0:
        raise ValueError(f"enc_num_blocks must be >= 0, got {c.enc_num_blocks}.")
    if len(c.enc_c_mults) != len(c.enc_strides):
        raise ValueError(f"enc_c_mults {c.enc_c_mults} and enc_strides {c.enc_strides} differ in length.")
    if c.enc_n_fft % 2 or c.enc_n_fft < c.enc_hop_length:
        raise ValueError(f"enc_n_fft must be even and >= enc_hop_length, got {c.enc_n_fft}, {c.enc_hop_length}.")
    if c.enc_latent_dim != 2 * c.vocoder_input_dim:
        raise ValueError(
            f"enc_latent_dim ({c.enc_latent_dim}) must be 2 * vocoder_input_dim ({c.vocoder_input_dim}): "
            "mean ‖ scale."
        )
    encoder_hop = c.enc_hop_length * math.prod(c.enc_strides)
    if encoder_hop != c.hop_length:
        raise ValueError(
            f"encoder compression enc_hop_length·prod(enc_strides) = {encoder_hop} != hop {c.hop_length}."
        )


def decoder_block_dims(config: AudioTokenizerConfig) -> tuple[tuple[int, int, int], ...]:
    """(input channels, output channels, upsampling stride) per decoder block, first block first."""
    mults = (1, *config.dec_c_mults)
    strides = tuple(reversed(config.dec_strides))
    n = len(strides)
    return tuple(
        (config.dec_dim * mults[n - i], config.dec_dim * mults[n - i - 1], stride) for i, stride in enumerate(strides)
    )


def encoder_stage_dims(config: AudioTokenizerConfig) -> tuple[tuple[int, int, int], ...]:
    """(stage channels, output channels after downsampling, stride) per encoder stage."""
    mults = config.enc_c_mults
    return tuple(
        (config.enc_dim * mults[i], config.enc_dim * mults[min(i + 1, len(mults) - 1)], stride)
        for i, stride in enumerate(config.enc_strides)
    )


def stft_input_features(config: AudioTokenizerConfig) -> int:
    """Encoder input width: [real ‖ imag] of n_fft/2+1 bins per waveform channel."""
    return (config.enc_n_fft + 2) * config.encoder_audio_channels


# ---------------------------------------------------------------------------------------------- primitives


def conv1d(
    x: Array,
    kernel: Array,
    *,
    stride: int = 1,
    dilation: int = 1,
    padding: tuple[int, int] = (0, 0),
    padding_mode: str = "zeros",
    groups: int = 1,
    precision: PrecisionLike = None,
) -> Array:
    """Cross-correlation like torch Conv1d. x [B, T, I], kernel [K, I/groups, O] -> [B, T', O]."""
    if padding_mode != "zeros" and padding != (0, 0):
        x = jnp.pad(x, ((0, 0), padding, (0, 0)), mode=_PADDING_MODES[padding_mode])
        padding = (0, 0)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride,),
        padding=(padding,),
        rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups,
        precision=precision,
    )


def conv_transpose1d(
    x: Array, kernel: Array, *, stride: int, padding: int, output_padding: int, precision: PrecisionLike = None
) -> Array:
    """Like torch ConvTranspose1d. x [B, L, I], kernel [K, I, O] -> [B, L', O],

    L' = (L - 1)·stride - 2·padding + K + output_padding.
    """
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(
        x,
        kernel[::-1],
        window_strides=(1,),
        padding=((k - 1 - padding, k - 1 - padding + output_padding),),
        lhs_dilation=(stride,),
        dimension_numbers=("NWC", "WIO", "NWC"),
        precision=precision,
    )


def fold_weight_norm(kernel_v: Array, kernel_g: Array, axis: int) -> Array:
    """w = g · v / ||v||, the norm taken over every axis but `axis` (torch weight_norm, dim=0), in float32."""
    v = kernel_v.astype(jnp.float32)
    reduce_axes = tuple(a for a in range(v.ndim) if a != axis)
    norm = jnp.sqrt(jnp.sum(v * v, axis=reduce_axes, keepdims=True))
    g = jnp.expand_dims(kernel_g.astype(jnp.float32), reduce_axes)
    return v * (g / norm)


def _init_weight_norm_g(kernel_v: Array, axis: int) -> Array:
    """g initialised to ||v|| so the folded kernel starts equal to v (as torch does)."""
    reduce_axes = tuple(a for a in range(kernel_v.ndim) if a != axis)
    return jnp.sqrt(jnp.sum(jnp.square(kernel_v.astype(jnp.float32)), axis=reduce_axes)).astype(kernel_v.dtype)


def stft_features(waveform: Array, n_fft: int, hop: int) -> Array:
    """One-sided STFT (periodic Hann, no centring, (n_fft-hop)/2 zeros each side), float32.

    waveform [M, N] -> [M, N // hop, n_fft + 2] laid out [real(n_fft/2+1) ‖ imag(n_fft/2+1)].
    Computed as one strided convolution against the windowed DFT basis (TPU-friendly; no FFT op).
    """
    pad_total = n_fft - hop
    x = jnp.pad(waveform.astype(jnp.float32), ((0, 0), (pad_total // 2, pad_total - pad_total // 2)))
    n = np.arange(n_fft)
    bins = np.arange(n_fft // 2 + 1)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)
    angle = 2.0 * np.pi * np.outer(n, bins) / n_fft
    basis = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1) * window[:, None]  # [n_fft, n_fft+2]
    kernel = jnp.asarray(basis[:, None, :], dtype=jnp.float32)
    return conv1d(x[..., None], kernel, stride=hop, precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------------- layers


class SnakeBeta(nn.Module):
    """x + 1/(exp(β) + 1e-9) · sin(exp(α)·x)², α and β per channel (log scale). x [..., C]."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (self.features,)
        alpha = jnp.exp(self.param("alpha", nn.initializers.zeros, shape, self.param_dtype).astype(self.dtype))
        beta = jnp.exp(self.param("beta", nn.initializers.zeros, shape, self.param_dtype).astype(self.dtype))
        x = x.astype(self.dtype)
        return x + jnp.reciprocal(beta + _SNAKE_EPS) * jnp.square(jnp.sin(alpha * x))


class WeightNormConv(nn.Module):
    """Weight-normed Conv1d. Params: kernel_v [K, I, O], kernel_g [O], bias [O]. x [B, T, I] -> [B, T', O]."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: tuple[int, int] = (0, 0)
    padding_mode: str = "zeros"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (self.kernel_size, x.shape[-1], self.features)
        kernel_v = self.param("kernel_v", nn.initializers.lecun_normal(), shape, self.param_dtype)
        kernel_g = self.param("kernel_g", lambda _: _init_weight_norm_g(kernel_v, axis=2))
        kernel = fold_weight_norm(kernel_v, kernel_g, axis=2).astype(self.dtype)
        y = conv1d(
            x.astype(self.dtype),
            kernel,
            stride=self.stride,
            dilation=self.dilation,
            padding=self.padding,
            padding_mode=self.padding_mode,
            precision=self.precision,
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class WeightNormConvTranspose(nn.Module):
    """Weight-normed ConvTranspose1d, kernel 2s, padding ceil(s/2), output padding s % 2: length ×s exactly.

    Params: kernel_v [K, I, O], kernel_g [I] (torch normalises per *input* channel here), bias [O].
    x [B, L, I] -> [B, L·stride, O].
    """

    features: int
    stride: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (2 * self.stride, x.shape[-1], self.features)
        kernel_v = self.param("kernel_v", nn.initializers.lecun_normal(), shape, self.param_dtype)
        kernel_g = self.param("kernel_g", lambda _: _init_weight_norm_g(kernel_v, axis=1))
        kernel = fold_weight_norm(kernel_v, kernel_g, axis=1).astype(self.dtype)
        y = conv_transpose1d(
            x.astype(self.dtype),
            kernel,
            stride=self.stride,
            padding=math.ceil(self.stride / 2),
            output_padding=self.stride % 2,
            precision=self.precision,
        )
        return y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)


class FP32LayerNorm(nn.Module):
    """LayerNorm over the last axis without bias, statistics and scale applied in float32, cast back."""

    features: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (self.features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        return (centred * jax.lax.rsqrt(variance + _LAYER_NORM_EPS) * scale.astype(jnp.float32)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------- decoder


class ResidualUnit(nn.Module):
    """x + conv_2(snake_2(conv_1(snake_1(x)))), conv_1 k7 dilated, conv_2 k1. x [B, T, C] -> [B, T, C]."""

    features: int
    dilation: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pad = 3 * self.dilation
        y = SnakeBeta(self.features, name="snake_1", **kw)(x)
        y = WeightNormConv(self.features, 7, dilation=self.dilation, padding=(pad, pad), precision=self.precision,
                           name="conv_1", **kw)(y)
        y = SnakeBeta(self.features, name="snake_2", **kw)(y)
        y = WeightNormConv(self.features, 1, precision=self.precision, name="conv_2", **kw)(y)
        return x + y


class DecoderBlock(nn.Module):
    """SnakeBeta, ×stride transposed conv, then residual units with dilations 1, 3, 9. [B, L, I] -> [B, L·s, O]."""

    features: int
    stride: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = SnakeBeta(x.shape[-1], name="snake", **kw)(x)
        x = WeightNormConvTranspose(self.features, self.stride, precision=self.precision, name="upsample", **kw)(x)
        for i, dilation in enumerate((1, 3, 9)):
            x = ResidualUnit(self.features, dilation, precision=self.precision, name=f"res_unit_{i}", **kw)(x)
        return x


class AudioDecoder(nn.Module):
    """Oobleck decoder. latents [B, T, latent channels] -> waveform [B, T·hop, audio channels] (not clamped)."""

    config: AudioTokenizerConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, latents: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        dims = decoder_block_dims(self.config)
        x = WeightNormConv(dims[0][0], 7, padding=(3, 3), name="conv_in", **kw)(latents)
        for i, (_, out_dim, stride) in enumerate(dims):
            x = DecoderBlock(out_dim, stride, name=f"block_{i}", **kw)(x)
        x = SnakeBeta(dims[-1][1], dtype=self.dtype, param_dtype=self.param_dtype, name="snake_out")(x)
        return WeightNormConv(self.config.dec_out_channels, 7, padding=(3, 3), use_bias=False, name="conv_out", **kw)(x)


# ---------------------------------------------------------------------------------------------- encoder


class ConvNeXtBlock(nn.Module):
    """x + pw_2(snake(pw_1(norm(depthwise_k7(x))))), hidden width 4C. x [B, T, C] -> [B, T, C]."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        y = nn.Conv(self.features, (7,), padding=((3, 3),), feature_group_count=self.features, name="dwconv", **kw)(x)
        y = FP32LayerNorm(self.features, param_dtype=self.param_dtype, name="norm")(y)
        y = nn.Dense(4 * self.features, name="pwconv_1", **kw)(y)
        y = SnakeBeta(4 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="snake")(y)
        y = nn.Dense(self.features, name="pwconv_2", **kw)(y)
        return x + y


class AudioEncoder(nn.Module):
    """SpecConvNeXt encoder. waveform [B, N, audio channels] (N a multiple of hop) -> moments [B, N/hop, 2·latent]."""

    config: AudioTokenizerConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, waveform: Array) -> Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        batch, num_samples, channels = waveform.shape
        per_channel = jnp.moveaxis(waveform, -1, 1).reshape(batch * channels, num_samples)
        spec = stft_features(per_channel, c.enc_n_fft, c.enc_hop_length)  # [B·C, F, n_fft+2]
        spec = spec.reshape(batch, channels, spec.shape[1], spec.shape[2])
        x = jnp.moveaxis(spec, 1, 2).reshape(batch, spec.shape[2], -1).astype(self.dtype)
        stages = encoder_stage_dims(c)
        x = WeightNormConv(stages[0][0], 1, use_bias=False, name="conv_in", **kw)(x)
        for i, (dim, out_dim, stride) in enumerate(stages):
            for j in range(c.enc_num_blocks):
                x = ConvNeXtBlock(dim, name=f"stage_{i}_block_{j}", **kw)(x)
            pad = math.ceil(stride / 2)
            x = WeightNormConv(out_dim, 2 * stride, stride=stride, padding=(pad, pad), padding_mode=c.padding_mode,
                               name=f"stage_{i}_downsample", **kw)(x)
        return WeightNormConv(c.enc_latent_dim, 1, use_bias=False, name="conv_out", **kw)(x)


# ---------------------------------------------------------------------------------------------- public API


def _check_finite(name: str, x: Array) -> None:
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf).")


def _check_floating(name: str, x: Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point (PCM scaled to [-1, 1]), got dtype {x.dtype}.")


@functools.partial(jax.jit, static_argnames=("config", "dtype", "param_dtype", "precision"))
def _decode_jit(
    params: Params,
    latents: Array,
    config: AudioTokenizerConfig,
    dtype: Any,
    param_dtype: Any,
    precision: PrecisionLike,
) -> Array:
    decoder = AudioDecoder(config, dtype=dtype, param_dtype=param_dtype, precision=precision)
    waveform = decoder.apply({"params": params}, jnp.swapaxes(latents, 1, 2).astype(dtype))
    return jnp.clip(jnp.swapaxes(waveform, 1, 2), -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "param_dtype", "precision"))
def _encode_jit(
    params: Params,
    waveform: Array,
    config: AudioTokenizerConfig,
    dtype: Any,
    param_dtype: Any,
    precision: PrecisionLike,
) -> tuple[Array, Array]:
    if config.normalize_volume:
        waveform = waveform / (jnp.max(jnp.abs(waveform)) + _PEAK_EPS) * _PEAK_TARGET
    pad = -waveform.shape[-1] % config.hop_length
    waveform = jnp.pad(waveform, ((0, 0), (0, 0), (0, pad))).astype(dtype)
    encoder = AudioEncoder(config, dtype=dtype, param_dtype=param_dtype, precision=precision)
    moments = jnp.swapaxes(encoder.apply({"params": params}, jnp.swapaxes(waveform, 1, 2)), 1, 2)
    mean, scale = jnp.split(moments, 2, axis=1)
    return mean, scale


@dataclasses.dataclass(frozen=True)
class AudioTokenizer:
    """The sound tokenizer bound to a config and dtypes; methods take the parameter tree explicitly.

    params = {"decoder": {...}, "encoder": {...}}  ("encoder" absent for decoder-only checkpoints).
    """

    config: AudioTokenizerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None

    def _modules(self) -> tuple[AudioEncoder, AudioDecoder]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        return AudioEncoder(self.config, **kw), AudioDecoder(self.config, **kw)

    def init(self, rng: Array) -> Params:
        """Fresh parameters (weight-norm g = ||v||, Snake α = β = 0, norms 1, biases 0), built under jit."""
        return jax.jit(self._init)(rng)

    def _init(self, rng: Array) -> Params:
        encoder, decoder = self._modules()
        dec_rng, enc_rng = jax.random.split(rng)
        latents = jnp.zeros((1, 1, self.config.latent_channels), self.dtype)
        params = {"decoder": decoder.init(dec_rng, latents)["params"]}
        if self.config.encoder_enabled:
            waveform = jnp.zeros((1, self.config.hop_length, self.config.encoder_audio_channels), self.dtype)
            params["encoder"] = encoder.init(enc_rng, waveform)["params"]
        return params

    def decode(self, params: Params, latents: Array) -> Array:
        """latents [B, latent channels, T] or [latent channels, T] -> waveform [B, audio ch, T·hop] in [-1, 1]."""
        latents = jnp.asarray(latents)
        if latents.ndim not in (2, 3):
            raise ValueError(f"latents must be [B, C, T] or [C, T], got shape {latents.shape}.")
        squeeze = latents.ndim == 2
        batched = latents[None] if squeeze else latents
        if batched.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents must have {self.config.latent_channels} channels on axis -2, got shape {latents.shape}."
            )
        if batched.shape[0] == 0 or batched.shape[2] == 0:
            raise ValueError(f"latents are empty: shape {latents.shape}.")
        _check_floating("latents", batched)
        _check_finite("latents", batched)
        if "decoder" not in params:
            raise ValueError("params has no 'decoder' tree.")
        waveform = aot.call(f"sound decode {list(batched.shape)}", _decode_jit, params["decoder"], batched,
                            self.config, self.dtype, self.param_dtype, self.precision)
        return waveform[0] if squeeze else waveform

    def encode_posterior(self, params: Params, waveform: Array) -> tuple[Array, Array]:
        """waveform [B, audio ch, N] -> (mean, std) each [B, latent channels, ceil(N / hop)].

        Like the reference in eval mode: peak-normalised to 0.95 over the *whole batch* (one max, not per item)
        when `normalize_volume`, then right-padded with zeros to a multiple of hop; std = softplus(scale) + 1e-4.
        """
        waveform = jnp.asarray(waveform)
        c = self.config
        if waveform.ndim != 3:
            raise ValueError(f"waveform must be [B, C, N], got shape {waveform.shape}.")
        if waveform.shape[1] != c.encoder_audio_channels:
            raise ValueError(f"waveform must have {c.encoder_audio_channels} channels, got shape {waveform.shape}.")
        if waveform.shape[0] == 0 or waveform.shape[2] == 0:
            raise ValueError(f"waveform is empty: shape {waveform.shape}.")
        _check_floating("waveform", waveform)
        _check_finite("waveform", waveform)
        if "encoder" not in params:
            raise ValueError("params has no 'encoder' tree (decoder-only checkpoint): cannot encode audio.")
        mean, scale = _encode_jit(params["encoder"], waveform, c, self.dtype, self.param_dtype, self.precision)
        return mean, jax.nn.softplus(scale) + _POSTERIOR_STD_FLOOR

    def encode(self, params: Params, waveform: Array) -> Array:
        """waveform [B, audio ch, N] -> posterior mean [B, latent channels, ceil(N / hop)] (the reference's mode())."""
        return self.encode_posterior(params, waveform)[0]


def latent_frames(num_samples: int, config: AudioTokenizerConfig) -> int:
    """Latent frames `encode` gives for a waveform of `num_samples` samples."""
    return -(-num_samples // config.hop_length)


def parameter_shapes(config: AudioTokenizerConfig) -> Params:
    """The parameter tree's shapes and dtypes (float32) without allocating it."""
    return jax.eval_shape(AudioTokenizer(config)._init, jax.random.key(0))

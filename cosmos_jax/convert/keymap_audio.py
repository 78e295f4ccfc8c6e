"""Key map between the diffusers `Cosmos3AVAEAudioTokenizer` state dict and the Flax sound-tokenizer tree.

One row per tensor: torch key, Flax path, layout kind and torch shape. Every kind is a lossless transpose or
reshape, so state -> params -> state is byte-identical. Weight norm stays as (g, v): see
`cosmos_jax.modeling.audio_tokenizer` for why.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from cosmos_jax.convert.tree_paths import set_path
from cosmos_jax.modeling.audio_tokenizer import (
    AudioTokenizerConfig,
    decoder_block_dims,
    encoder_stage_dims,
    stft_input_features,
)

Params = dict[str, Any]
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LayoutKind:
    """A lossless torch <-> Flax layout change and the Flax shape it produces from a torch shape."""

    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    flax_shape: Callable[[Shape], Shape]


def _reverse_axes(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (2, 1, 0))


LAYOUTS: dict[str, LayoutKind] = {
    # Conv1d weight / weight_v (O, I, K) <-> (K, I, O); also the depthwise conv (C, 1, K) <-> (K, 1, C).
    "conv": LayoutKind(_reverse_axes, _reverse_axes, lambda s: (s[2], s[1], s[0])),
    # ConvTranspose1d weight_v (I, O, K) <-> (K, I, O).
    "conv_transpose": LayoutKind(
        lambda x: np.transpose(x, (2, 0, 1)), lambda x: np.transpose(x, (1, 2, 0)), lambda s: (s[2], s[0], s[1])
    ),
    # weight_g (C, 1, 1) <-> (C,)
    "weight_g": LayoutKind(lambda x: x.reshape(-1), lambda x: x.reshape(-1, 1, 1), lambda s: (s[0],)),
    # Snake alpha / beta (1, C, 1) <-> (C,)
    "snake": LayoutKind(lambda x: x.reshape(-1), lambda x: x.reshape(1, -1, 1), lambda s: (s[1],)),
    # 1x1 Conv1d weight (O, I, 1) <-> Dense kernel (I, O)
    "dense": LayoutKind(lambda x: x[:, :, 0].T, lambda x: x.T[:, :, None], lambda s: (s[1], s[0])),
    # bias, LayerNorm weight
    "vector": LayoutKind(lambda x: x, lambda x: x, lambda s: s),
}


@dataclasses.dataclass(frozen=True)
class KeyRow:
    torch_key: str
    flax_path: tuple[str, ...]
    layout: str
    torch_shape: Shape

    @property
    def flax_shape(self) -> Shape:
        return LAYOUTS[self.layout].flax_shape(self.torch_shape)


def _weight_norm_rows(
    torch_prefix: str, flax_path: tuple[str, ...], out_dim: int, in_dim: int, kernel: int, bias: bool
) -> Iterator[KeyRow]:
    yield KeyRow(f"{torch_prefix}.weight_g", (*flax_path, "kernel_g"), "weight_g", (out_dim, 1, 1))
    yield KeyRow(f"{torch_prefix}.weight_v", (*flax_path, "kernel_v"), "conv", (out_dim, in_dim, kernel))
    if bias:
        yield KeyRow(f"{torch_prefix}.bias", (*flax_path, "bias"), "vector", (out_dim,))


def _snake_rows(torch_prefix: str, flax_path: tuple[str, ...], dim: int) -> Iterator[KeyRow]:
    for name in ("alpha", "beta"):
        yield KeyRow(f"{torch_prefix}.{name}", (*flax_path, name), "snake", (1, dim, 1))


def _decoder_rows(config: AudioTokenizerConfig) -> Iterator[KeyRow]:
    dims = decoder_block_dims(config)
    root = ("decoder",)
    yield from _weight_norm_rows("decoder.conv1", (*root, "conv_in"), dims[0][0], config.vocoder_input_dim, 7, True)
    for i, (in_dim, out_dim, stride) in enumerate(dims):
        t, f = f"decoder.block.{i}", (*root, f"block_{i}")
        yield from _snake_rows(f"{t}.snake1", (*f, "snake"), in_dim)
        yield KeyRow(f"{t}.conv_t1.weight_g", (*f, "upsample", "kernel_g"), "weight_g", (in_dim, 1, 1))
        yield KeyRow(
            f"{t}.conv_t1.weight_v", (*f, "upsample", "kernel_v"), "conv_transpose", (in_dim, out_dim, 2 * stride)
        )
        yield KeyRow(f"{t}.conv_t1.bias", (*f, "upsample", "bias"), "vector", (out_dim,))
        for r in range(3):
            tr, fr = f"{t}.res_unit{r + 1}", (*f, f"res_unit_{r}")
            yield from _snake_rows(f"{tr}.snake1", (*fr, "snake_1"), out_dim)
            yield from _weight_norm_rows(f"{tr}.conv1", (*fr, "conv_1"), out_dim, out_dim, 7, True)
            yield from _snake_rows(f"{tr}.snake2", (*fr, "snake_2"), out_dim)
            yield from _weight_norm_rows(f"{tr}.conv2", (*fr, "conv_2"), out_dim, out_dim, 1, True)
    yield from _snake_rows("decoder.snake1", (*root, "snake_out"), dims[-1][1])
    yield from _weight_norm_rows("decoder.conv2", (*root, "conv_out"), config.dec_out_channels, dims[-1][1], 7, False)


def _encoder_rows(config: AudioTokenizerConfig) -> Iterator[KeyRow]:
    stages = encoder_stage_dims(config)
    root = ("encoder",)
    index = 0
    yield from _weight_norm_rows(
        f"encoder.layers.{index}", (*root, "conv_in"), stages[0][0], stft_input_features(config), 1, False
    )
    for i, (dim, out_dim, stride) in enumerate(stages):
        for j in range(config.enc_num_blocks):
            index += 1
            t, f = f"encoder.layers.{index}", (*root, f"stage_{i}_block_{j}")
            yield KeyRow(f"{t}.dwconv.1.weight", (*f, "dwconv", "kernel"), "conv", (dim, 1, 7))
            yield KeyRow(f"{t}.dwconv.1.bias", (*f, "dwconv", "bias"), "vector", (dim,))
            yield KeyRow(f"{t}.norm.weight", (*f, "norm", "scale"), "vector", (dim,))
            yield KeyRow(f"{t}.pwconv1.weight", (*f, "pwconv_1", "kernel"), "dense", (4 * dim, dim, 1))
            yield KeyRow(f"{t}.pwconv1.bias", (*f, "pwconv_1", "bias"), "vector", (4 * dim,))
            yield from _snake_rows(f"{t}.act", (*f, "snake"), 4 * dim)
            yield KeyRow(f"{t}.pwconv2.weight", (*f, "pwconv_2", "kernel"), "dense", (dim, 4 * dim, 1))
            yield KeyRow(f"{t}.pwconv2.bias", (*f, "pwconv_2", "bias"), "vector", (dim,))
        index += 1
        yield from _weight_norm_rows(
            f"encoder.layers.{index}", (*root, f"stage_{i}_downsample"), out_dim, dim, 2 * stride, True
        )
    index += 1
    yield from _weight_norm_rows(
        f"encoder.layers.{index}", (*root, "conv_out"), config.enc_latent_dim, stages[-1][1], 1, False
    )


def audio_key_table(config: AudioTokenizerConfig, include_encoder: bool | None = None) -> tuple[KeyRow, ...]:
    """Every tensor of the tokenizer, decoder first. `include_encoder` defaults to `config.encoder_enabled`."""
    with_encoder = config.encoder_enabled if include_encoder is None else include_encoder
    return tuple(_decoder_rows(config)) + (tuple(_encoder_rows(config)) if with_encoder else ())


def _raise_if_mismatched(what: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> None:
    if not (missing or unexpected or wrong):
        return
    lines = [f"{what} does not match the sound tokenizer config:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
    raise ValueError("\n".join(lines))


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def audio_params_from_torch_state(state: Mapping[str, Any], config: AudioTokenizerConfig) -> Params:
    """diffusers state dict (name -> array, numpy-convertible) -> Flax tree {"decoder": ..., "encoder": ...}.

    Like the reference loader, a state with no `encoder.*` key at all is a decoder-only checkpoint: the
    result has no "encoder" tree. Missing, unexpected and wrong-shape keys are reported together.
    """
    has_encoder = config.encoder_enabled and any(k.startswith("encoder.") for k in state)
    rows = audio_key_table(config, include_encoder=has_encoder)
    expected = {row.torch_key for row in rows}
    missing = [row.torch_key for row in rows if row.torch_key not in state]
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [
        f"{row.torch_key}: got {tuple(np.shape(state[row.torch_key]))}, expected {row.torch_shape}"
        for row in rows
        if row.torch_key in state and tuple(np.shape(state[row.torch_key])) != row.torch_shape
    ]
    _raise_if_mismatched("state dict", missing, unexpected, wrong)
    params: Params = {}
    for row in rows:
        value = LAYOUTS[row.layout].to_flax(np.asarray(state[row.torch_key]))
        set_path(params, row.flax_path, np.ascontiguousarray(value))
    return params


def audio_state_from_params(params: Mapping[str, Any], config: AudioTokenizerConfig) -> dict[str, np.ndarray]:
    """Flax tree -> diffusers state dict (name -> numpy array, dtypes kept)."""
    rows = audio_key_table(config, include_encoder=config.encoder_enabled and "encoder" in params)
    flat = _flatten(params)
    expected = {row.flax_path for row in rows}
    missing = ["/".join(row.flax_path) for row in rows if row.flax_path not in flat]
    unexpected = sorted("/".join(path) for path in flat if path not in expected)
    wrong = [
        f"{'/'.join(row.flax_path)}: got {tuple(np.shape(flat[row.flax_path]))}, expected {row.flax_shape}"
        for row in rows
        if row.flax_path in flat and tuple(np.shape(flat[row.flax_path])) != row.flax_shape
    ]
    _raise_if_mismatched("parameter tree", missing, unexpected, wrong)
    return {
        row.torch_key: np.ascontiguousarray(LAYOUTS[row.layout].to_torch(np.asarray(flat[row.flax_path])))
        for row in rows
    }

"""Key map between a diffusers `AutoencoderKLWan` state dict and the `wan_vae` parameter tree.

The map is data: `vae_key_table(config)` lists one `KeyEntry` per tensor (196 for Cosmos 3), each naming the
torch key, the Flax path, the layout transform and the torch shape. Flax paths follow the torch module path with
list indices joined to the name (`down_blocks.1` -> `down_blocks_1`), the `nn.Sequential` index of the resample
conv dropped (`resample.1` -> `resample`) and `weight` renamed `kernel`.

Transforms (torch -> Flax; each is a pure permutation/reshape, so the round trip is byte-identical and keeps dtype):
    conv3d  (O,I,kt,kh,kw) -> (kt,kh,kw,I,O)
    conv2d  (O,I,kh,kw)    -> (kh,kw,I,O)
    dense   (O,I,1,1[,1])  -> (I,O)          1x1 convolutions
    vector  (C[,1,1[,1]])  -> (C,)           biases and RMS-norm gammas
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from cosmos_jax.modeling.wan_vae import WanVAEConfig


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One tensor: where it lives in torch and in Flax, and how its layout changes."""

    torch_key: str
    flax_path: tuple[str, ...]
    transform: str  # one of TRANSFORMS
    torch_shape: tuple[int, ...]

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return _to_flax(np.empty(self.torch_shape, np.int8), self.transform).shape


def _to_flax(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv3d":
        return x.transpose(2, 3, 4, 1, 0)
    if transform == "conv2d":
        return x.transpose(2, 3, 1, 0)
    if transform == "dense":
        return x.reshape(x.shape[:2]).T
    if transform == "vector":
        return x.reshape(x.shape[0])
    raise ValueError(f"unknown transform {transform!r}")


def _to_torch(x: np.ndarray, transform: str, torch_shape: tuple[int, ...]) -> np.ndarray:
    if transform == "conv3d":
        return x.transpose(4, 3, 0, 1, 2)
    if transform == "conv2d":
        return x.transpose(3, 2, 0, 1)
    if transform == "dense":
        return x.T.reshape(torch_shape)
    if transform == "vector":
        return x.reshape(torch_shape)
    raise ValueError(f"unknown transform {transform!r}")


TRANSFORMS = ("conv3d", "conv2d", "dense", "vector")


def flax_path_of(torch_key: str) -> tuple[str, ...]:
    """`encoder.down_blocks.1.downsampler.resample.1.weight` -> `(encoder, down_blocks_1, downsampler, resample,
    kernel)`."""
    parts: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit():
            if parts[-1] != "resample":
                parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append("kernel" if part == "weight" else part)
    return tuple(parts)


def _conv(prefix: str, cin: int, cout: int, kernel: tuple[int, ...] = (3, 3, 3)) -> Iterator[tuple[str, str, tuple]]:
    transform = "conv3d" if len(kernel) == 3 else "conv2d"
    yield f"{prefix}.weight", transform, (cout, cin, *kernel)
    yield f"{prefix}.bias", "vector", (cout,)


def _dense(prefix: str, cin: int, cout: int, ones: int) -> Iterator[tuple[str, str, tuple]]:
    yield f"{prefix}.weight", "dense", (cout, cin, *(1,) * ones)
    yield f"{prefix}.bias", "vector", (cout,)


def _norm(prefix: str, channels: int, ones: int = 3) -> Iterator[tuple[str, str, tuple]]:
    yield f"{prefix}.gamma", "vector", (channels, *(1,) * ones)


def _resnet(prefix: str, cin: int, cout: int) -> Iterator[tuple[str, str, tuple]]:
    yield from _norm(f"{prefix}.norm1", cin)
    yield from _conv(f"{prefix}.conv1", cin, cout)
    yield from _norm(f"{prefix}.norm2", cout)
    yield from _conv(f"{prefix}.conv2", cout, cout)
    if cin != cout:
        yield from _dense(f"{prefix}.conv_shortcut", cin, cout, 3)


def _mid(prefix: str, dim: int) -> Iterator[tuple[str, str, tuple]]:
    yield from _norm(f"{prefix}.attentions.0.norm", dim, ones=2)
    yield from _dense(f"{prefix}.attentions.0.to_qkv", dim, 3 * dim, 2)
    yield from _dense(f"{prefix}.attentions.0.proj", dim, dim, 2)
    yield from _resnet(f"{prefix}.resnets.0", dim, dim)
    yield from _resnet(f"{prefix}.resnets.1", dim, dim)


def _encoder(c: WanVAEConfig) -> Iterator[tuple[str, str, tuple]]:
    dims, stages = c.encoder_dims, len(c.dim_mult) - 1
    yield from _conv("encoder.conv_in", c.in_channels, dims[0])
    for i in range(len(c.dim_mult)):
        cin = dims[i]
        for j in range(c.num_res_blocks):
            yield from _resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin, dims[i + 1])
            cin = dims[i + 1]
        if i != stages:
            yield from _conv(f"encoder.down_blocks.{i}.downsampler.resample.1", cin, cin, (3, 3))
            if c.temperal_downsample[i]:
                yield from _conv(f"encoder.down_blocks.{i}.downsampler.time_conv", cin, cin, (3, 1, 1))
    yield from _mid("encoder.mid_block", dims[-1])
    yield from _norm("encoder.norm_out", dims[-1])
    yield from _conv("encoder.conv_out", dims[-1], 2 * c.z_dim)


def _decoder(c: WanVAEConfig) -> Iterator[tuple[str, str, tuple]]:
    dims, stages = c.decoder_dims, len(c.dim_mult) - 1
    yield from _conv("decoder.conv_in", c.z_dim, dims[0])
    yield from _mid("decoder.mid_block", dims[0])
    for i in range(len(c.dim_mult)):
        cin = dims[i]
        for j in range(c.num_res_blocks + 1):
            yield from _resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin, dims[i + 1])
            cin = dims[i + 1]
        if i != stages:
            yield from _conv(f"decoder.up_blocks.{i}.upsampler.resample.1", cin, cin, (3, 3))
            if c.temporal_upsample[i]:
                yield from _conv(f"decoder.up_blocks.{i}.upsampler.time_conv", cin, 2 * cin, (3, 1, 1))
    yield from _norm("decoder.norm_out", dims[-1])
    yield from _conv("decoder.conv_out", dims[-1], c.out_channels)


def vae_key_table(config: WanVAEConfig) -> list[KeyEntry]:
    """Every tensor of the VAE described by `config`, in the diffusers state-dict order."""
    rows = [*_encoder(config), *_dense("quant_conv", 2 * config.z_dim, 2 * config.z_dim, 3),
            *_dense("post_quant_conv", config.z_dim, config.z_dim, 3), *_decoder(config)]
    return [KeyEntry(key, flax_path_of(key), transform, tuple(shape)) for key, transform, shape in rows]


def vae_params_from_torch_state(state: Mapping[str, np.ndarray], config: WanVAEConfig) -> dict[str, Any]:
    """diffusers state dict (numpy arrays) -> nested Flax params of numpy arrays, dtypes kept.

    Raises one ValueError listing all missing, unexpected and wrongly shaped keys.
    """
    table = vae_key_table(config)
    expected = {e.torch_key for e in table}
    missing = [e.torch_key for e in table if e.torch_key not in state]
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [f"{e.torch_key}: expected {e.torch_shape}, got {tuple(np.shape(state[e.torch_key]))}"
             for e in table if e.torch_key in state and tuple(np.shape(state[e.torch_key])) != e.torch_shape]
    if missing or unexpected or wrong:
        raise ValueError(
            "VAE state dict does not match the config: "
            f"missing {missing}; unexpected {unexpected}; wrong shape {wrong}"
        )
    params: dict[str, Any] = {}
    for e in table:
        node = params
        for name in e.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[e.flax_path[-1]] = np.ascontiguousarray(_to_flax(np.asarray(state[e.torch_key]), e.transform))
    return params


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def vae_state_from_params(params: Mapping[str, Any], config: WanVAEConfig) -> dict[str, np.ndarray]:
    """Flax params -> diffusers state dict of numpy arrays (exact inverse of `vae_params_from_torch_state`)."""
    table = vae_key_table(config)
    flat = _flatten(params)
    expected = {e.flax_path for e in table}
    missing = ["/".join(e.flax_path) for e in table if e.flax_path not in flat]
    unexpected = sorted("/".join(p) for p in flat if p not in expected)
    wrong = [f"{'/'.join(e.flax_path)}: expected {e.flax_shape}, got {tuple(np.shape(flat[e.flax_path]))}"
             for e in table if e.flax_path in flat and tuple(np.shape(flat[e.flax_path])) != e.flax_shape]
    if missing or unexpected or wrong:
        raise ValueError(
            "VAE params do not match the config: "
            f"missing {missing}; unexpected {unexpected}; wrong shape {wrong}"
        )
    return {e.torch_key: np.ascontiguousarray(_to_torch(np.asarray(flat[e.flax_path]), e.transform, e.torch_shape))
            for e in table}

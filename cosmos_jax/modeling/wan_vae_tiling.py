"""Spatial tiling for the Wan VAE: overlapping tiles run apart and linearly blended.

Follows diffusers `AutoencoderKLWan.tiled_decode` / `tiled_encode`: tiles start every `stride` pixels and span
`tile` pixels (cropped at the frame edge); each tile's output is blended with its already blended upper and left
neighbours over the overlap (weight of the new tile rising linearly from 0) and contributes its first `stride`
rows and columns to the result. Decode blends in the decoder's patch space before the clamp; encode blends the
posterior mean. Every tile runs the full temporal streaming, so memory scales with the tile area, not the frame's.

Sizes count output pixels for decode and input pixels for encode. (diffusers' `tiled_encode` reads its tile
sizes in patchified pixels, so its encode tiles are `patch_size` times larger than the same numbers here.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VAETiling:
    """Tile size and stride in video pixels, named and defaulted as diffusers' `enable_tiling` arguments.

    Tiling applies only to frames wider or taller than one tile; sizes must be multiples of the VAE's spatial
    compression (checked by `check_tiling`).
    """

    tile_height: int = 256
    tile_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    def __post_init__(self) -> None:
        for name in ("tile_height", "tile_width", "stride_height", "stride_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VAETiling.{name} must be a positive int, got {value!r}")
        for axis in ("height", "width"):
            tile, stride = getattr(self, f"tile_{axis}"), getattr(self, f"stride_{axis}")
            if stride > tile:
                raise ValueError(f"VAETiling.stride_{axis} {stride} exceeds tile_{axis} {tile} (gaps between tiles)")


def check_tiling(tiling: VAETiling, compression: int) -> None:
    """Raise ValueError unless every tile size and stride is a multiple of `compression` pixels."""
    bad = {k: v for k, v in dataclasses.asdict(tiling).items() if v % compression}
    if bad:
        raise ValueError(f"VAETiling sizes must be multiples of the spatial compression {compression}, got {bad}")


def tiling_applies(tiling: VAETiling, latent_hw: tuple[int, int], compression: int) -> bool:
    """Whether latents of spatial size `latent_hw` span more than one tile (the reference's switch)."""
    h, w = latent_hw
    return h > tiling.tile_height // compression or w > tiling.tile_width // compression


def blend_edge(previous: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """`tile` with its first `extent` entries along `axis` mixed into the last ones of `previous`.

    Entry k gets `previous[-e+k]·(1 − k/e) + tile[k]·(k/e)`, e = min(extent, both lengths); computed in f32 and
    returned in `tile`'s dtype. Shapes agree except along `axis`.
    """
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    ramp = np.arange(extent, dtype=np.float64) / extent
    shape = [1] * tile.ndim
    shape[axis] = extent
    keep = jnp.asarray((1.0 - ramp).astype(np.float32).reshape(shape))
    take = jnp.asarray(ramp.astype(np.float32).reshape(shape))
    tail = jax.lax.slice_in_dim(previous, previous.shape[axis] - extent, previous.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(tile, 0, extent, axis=axis)
    mixed = tail.astype(jnp.float32) * keep + head.astype(jnp.float32) * take
    return jax.lax.dynamic_update_slice_in_dim(tile, mixed.astype(tile.dtype), 0, axis=axis)


def _blend_grid(run_tile: Callable[[slice, slice], jax.Array], size: tuple[int, int], tile: tuple[int, int],
                step: tuple[int, int], out_step: tuple[int, int], blend: tuple[int, int],
                out_size: tuple[int, int]) -> jax.Array:
    """Tiles of an input of spatial `size`, starting every `step` and spanning `tile`, mapped by
    `run_tile(rows, columns) -> [B,T,h,w,C]`, blended over `blend` output entries, each keeping its first
    `out_step` ones; returns `[B,T,out_size...,C]`. Besides the kept pieces, only the left neighbour and the
    bottom `blend` rows of the row above are held."""
    rows, above = [], None
    for top in range(0, size[0], step[0]):
        pieces, strips, previous = [], [], None
        for column, left in enumerate(range(0, size[1], step[1])):
            out = run_tile(slice(top, top + tile[0]), slice(left, left + tile[1]))
            if above is not None:
                out = blend_edge(above[column], out, blend[0], axis=2)
            if previous is not None:
                out = blend_edge(previous, out, blend[1], axis=3)
            pieces.append(out[:, :, : out_step[0], : out_step[1]])
            strips.append(out[:, :, out.shape[2] - min(blend[0], out.shape[2]) :])
            previous = out
        rows.append(jnp.concatenate(pieces, axis=3))
        above = strips
    return jnp.concatenate(rows, axis=2)[:, :, : out_size[0], : out_size[1]]


def tiled_decode(decode_tile: Callable[[jax.Array], jax.Array], z: jax.Array, tiling: VAETiling,
                 compression: int, patch: int) -> jax.Array:
    """Latents `[B,z,T,h,w]` -> blended decoder output `[B,F,h·s,w·s,C]` (s = compression / patch).

    `decode_tile` maps a latent tile `[B,z,T,th,tw]` to its unclamped patch-space frames `[B,F,th·s,tw·s,C]`.
    """
    check_tiling(tiling, compression)
    scale = compression // patch
    tile = (tiling.tile_height // compression, tiling.tile_width // compression)
    step = (tiling.stride_height // compression, tiling.stride_width // compression)
    blend = ((tiling.tile_height - tiling.stride_height) // patch,
             (tiling.tile_width - tiling.stride_width) // patch)
    size = (z.shape[3], z.shape[4])
    return _blend_grid(lambda rows, columns: decode_tile(z[:, :, :, rows, columns]), size, tile, step,
                       (step[0] * scale, step[1] * scale), blend, (size[0] * scale, size[1] * scale))


def tiled_encode(encode_tile: Callable[[jax.Array], jax.Array], video: jax.Array, tiling: VAETiling,
                 compression: int) -> jax.Array:
    """Video `[B,3,F,H,W]` -> blended posterior mean `[B,T,H/s,W/s,z]` (s = compression).

    `encode_tile` maps a pixel tile `[B,3,F,th,tw]` to its mean `[B,T,th/s,tw/s,z]`.
    """
    check_tiling(tiling, compression)
    tile = (tiling.tile_height, tiling.tile_width)
    step = (tiling.stride_height, tiling.stride_width)
    blend = ((tile[0] - step[0]) // compression, (tile[1] - step[1]) // compression)
    out_size = (video.shape[3] // compression, video.shape[4] // compression)
    size = (video.shape[3], video.shape[4])
    return _blend_grid(lambda rows, columns: encode_tile(video[:, :, :, rows, columns]), size, tile, step,
                       (step[0] // compression, step[1] // compression), blend, out_size)

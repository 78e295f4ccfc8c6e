"""Spatial tiling for the Wan VAE decoder: overlapping latent tiles decoded apart and linearly blended.

Follows diffusers `AutoencoderKLWan.tiled_decode`: tiles start every `stride` latent pixels and span `tile` latent
pixels (cropped at the frame edge); each decoded tile is blended, in the decoder's patch space and before the
clamp, with its already blended upper and left neighbours over `(tile - stride)` output rows/columns (weight of the
new tile rising linearly from 0), and contributes its first `stride` rows and columns to the result. Every tile is
decoded with the full temporal streaming, so memory scales with the tile area instead of the frame area.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VAETiling:
    """Tile size and stride in output pixels, as diffusers' `enable_tiling` spells them (same defaults).

    Tiling applies only to latents wider or taller than one tile; sizes must be multiples of the VAE's spatial
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


def tiled_decode(decode_tile: Callable[[jax.Array], jax.Array], z: jax.Array, tiling: VAETiling,
                 compression: int, patch: int) -> jax.Array:
    """Latents `[B,z,T,h,w]` -> blended decoder output `[B,F,h·s,w·s,C]` (s = compression / patch).

    `decode_tile` maps a latent tile `[B,z,T,th,tw]` to its unclamped patch-space frames `[B,F,th·s,tw·s,C]`.
    Only the previous row of tiles is kept for blending.
    """
    check_tiling(tiling, compression)
    scale = compression // patch
    tile_h, tile_w = tiling.tile_height // compression, tiling.tile_width // compression
    step_h, step_w = tiling.stride_height // compression, tiling.stride_width // compression
    blend_h = (tiling.tile_height - tiling.stride_height) // patch
    blend_w = (tiling.tile_width - tiling.stride_width) // patch
    height, width = z.shape[3], z.shape[4]
    rows, above = [], None
    for top in range(0, height, step_h):
        current = []
        for column, left in enumerate(range(0, width, step_w)):
            tile = decode_tile(z[:, :, :, top : top + tile_h, left : left + tile_w])
            if above is not None:
                tile = blend_edge(above[column], tile, blend_h, axis=2)
            if current:
                tile = blend_edge(current[-1], tile, blend_w, axis=3)
            current.append(tile)
        rows.append(jnp.concatenate([t[:, :, : step_h * scale, : step_w * scale] for t in current], axis=3))
        above = current
    return jnp.concatenate(rows, axis=2)[:, :, : height * scale, : width * scale]

"""Host-side layout of the joint sequence, exactly as `Cosmos3OmniPipeline` builds it (docs/model.md, "Sequence layout and position ids").

One sequence is `[text (L)] [vision (T*hp*wp)] [sound (Ts)] [action (chunk)]`. Text positions are 0..L-1 on all
three mRoPE axes; vision, sound and action all start at the same temporal offset L + margin (15000), with
spatial ids reset per item and fps modulation of the temporal ids. Everything here is numpy with static shapes;
arithmetic is float32 step by step like the reference so positions agree bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.inputs import TextInputs
from cosmos_jax.modeling.patchify import patch_grid


def text_position_ids(num_tokens: int, temporal_offset: int = 0) -> np.ndarray:
    """[3, num_tokens] float32: t = h = w = offset + 0..num_tokens-1."""
    ids = np.arange(num_tokens, dtype=np.float32) + np.float32(temporal_offset)
    return np.broadcast_to(ids, (3, num_tokens)).copy()


def vae_position_ids(
    grid_t: int,
    grid_h: int,
    grid_w: int,
    temporal_offset: int | float,
    *,
    reset_spatial_ids: bool = True,
    fps: float | None = None,
    base_fps: float = 24.0,
    temporal_compression: int = 4,
    base_temporal_compression: int | None = None,
    start_frame_offset: int = 0,
) -> np.ndarray:
    """[3, grid_t*grid_h*grid_w] float32 positions for a (t, h, w)-raster token grid.

    With fps modulation (fps given and grid_t > 1) frame f sits at
    (f + start) / (fps / tcf) * (base_fps / base_tcf) + offset; otherwise at f + offset + start.
    """
    base_tcf = temporal_compression if base_temporal_compression is None else base_temporal_compression
    if fps is not None and grid_t > 1:
        tps = np.float32(fps / temporal_compression)
        base_tps = np.float32(base_fps / base_tcf)
        frames = np.arange(grid_t, dtype=np.float32) + np.float32(start_frame_offset)
        t = (frames / tps * base_tps + np.float32(temporal_offset)).astype(np.float32)
    else:
        t = (np.arange(grid_t, dtype=np.int64) + int(temporal_offset) + start_frame_offset).astype(np.float32)
    spatial_offset = 0 if reset_spatial_ids else int(temporal_offset)
    tt = np.repeat(t, grid_h * grid_w)
    hh = np.tile(np.repeat(np.arange(grid_h), grid_w), grid_t) + spatial_offset
    ww = np.tile(np.arange(grid_w), grid_t * grid_h) + spatial_offset
    return np.stack([tt, hh.astype(np.float32), ww.astype(np.float32)]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """The layout of one joint sequence (one guidance branch or one training sample).

    position_ids [3, und_len + num_gen] float32; vision_noisy [T] bool; action_noisy [chunk] bool.
    """

    und_len: int
    latent_shape: tuple[int, int, int]
    vision_grid: tuple[int, int, int]
    vision_noisy: np.ndarray
    sound_len: int
    action_noisy: np.ndarray
    position_ids: np.ndarray

    @property
    def num_vision(self) -> int:
        return int(np.prod(self.vision_grid))

    @property
    def action_len(self) -> int:
        return len(self.action_noisy)

    @property
    def num_gen(self) -> int:
        return self.num_vision + self.sound_len + self.action_len

    # Absolute indexes in the reference's packed sequence (what the diffusers transformer takes).
    def vision_sequence_indexes(self) -> np.ndarray:
        return np.arange(self.und_len, self.und_len + self.num_vision)

    def vision_mse_loss_indexes(self) -> np.ndarray:
        per_frame = self.vision_grid[1] * self.vision_grid[2]
        frames = np.flatnonzero(self.vision_noisy)
        return (self.und_len + frames[:, None] * per_frame + np.arange(per_frame)).reshape(-1)

    def sound_sequence_indexes(self) -> np.ndarray:
        start = self.und_len + self.num_vision
        return np.arange(start, start + self.sound_len)

    def action_sequence_indexes(self) -> np.ndarray:
        start = self.und_len + self.num_vision + self.sound_len
        return np.arange(start, start + self.action_len)

    def action_mse_loss_indexes(self) -> np.ndarray:
        return self.action_sequence_indexes()[self.action_noisy]


def layout_sequence(
    config: Cosmos3Config,
    und_len: int,
    latent_shape: tuple[int, int, int],
    *,
    fps: float | None,
    clean_vision_frames: Sequence[int] = (),
    sound_len: int = 0,
    action_len: int = 0,
    clean_action_rows: Sequence[int] = (),
    vae_temporal_compression: int = 4,
) -> SequenceLayout:
    """Lay out one sequence: text of `und_len` tokens, a latent video of (T, H, W), optional sound/action rows.

    `clean_vision_frames` / `clean_action_rows` are the conditioning (not noisy) latent frames / action rows;
    indexes outside the item are ignored, as in the reference.
    """
    if und_len < 1:
        raise ValueError(f"the text segment must hold at least one token, got und_len={und_len}")
    t = latent_shape[0]
    if t < 1 or min(latent_shape) < 1:
        raise ValueError(f"latent shape must be positive (T, H, W), got {latent_shape}")
    grid = patch_grid(latent_shape, config.latent_patch_size)
    offset = und_len + config.unified_3d_mrope_temporal_modality_margin
    effective_fps = fps if config.enable_fps_modulation else None
    reset = config.unified_3d_mrope_reset_spatial_ids
    segments = [
        text_position_ids(und_len),
        vae_position_ids(*grid, offset, reset_spatial_ids=reset, fps=effective_fps, base_fps=float(config.base_fps),
                         temporal_compression=vae_temporal_compression),
    ]
    if sound_len:
        segments.append(vae_position_ids(
            sound_len, 1, 1, offset, reset_spatial_ids=reset,
            fps=config.sound_latent_fps if config.enable_fps_modulation else None,
            base_fps=float(config.base_fps), temporal_compression=1))
    if action_len:
        segments.append(vae_position_ids(
            action_len, 1, 1, offset, reset_spatial_ids=reset, fps=effective_fps, base_fps=float(config.base_fps),
            temporal_compression=1, base_temporal_compression=vae_temporal_compression, start_frame_offset=1))
    clean_frames = {i for i in clean_vision_frames if 0 <= i < t}
    clean_rows = {i for i in clean_action_rows if 0 <= i < action_len}
    return SequenceLayout(
        und_len=und_len,
        latent_shape=tuple(latent_shape),
        vision_grid=grid,
        vision_noisy=np.array([i not in clean_frames for i in range(t)], dtype=bool),
        sound_len=sound_len,
        action_noisy=np.array([i not in clean_rows for i in range(action_len)], dtype=bool),
        position_ids=np.concatenate(segments, axis=1),
    )


def batch_text(token_ids: Sequence[Sequence[int]], layouts: Sequence[SequenceLayout], pad_id: int = 0) -> TextInputs:
    """Right-pad each row's prompt to the longest one: TextInputs of numpy arrays [B, Lu]."""
    if len(token_ids) != len(layouts):
        raise ValueError(f"{len(token_ids)} prompts for {len(layouts)} layouts")
    for ids, layout in zip(token_ids, layouts):
        if len(ids) != layout.und_len:
            raise ValueError(f"prompt of {len(ids)} tokens laid out as und_len={layout.und_len}")
    lu = max(layout.und_len for layout in layouts)
    input_ids = np.full((len(layouts), lu), pad_id, dtype=np.int32)
    positions = np.zeros((len(layouts), 3, lu), dtype=np.float32)
    for b, (ids, layout) in enumerate(zip(token_ids, layouts)):
        input_ids[b, : layout.und_len] = ids
        positions[b, :, : layout.und_len] = layout.position_ids[:, : layout.und_len]
    und_len = np.array([layout.und_len for layout in layouts], dtype=np.int32)
    return TextInputs(input_ids=input_ids, und_len=und_len, position_ids=positions)


def batch_generator_positions(layouts: Sequence[SequenceLayout]) -> np.ndarray:
    """[B, 3, Lg] generator position ids; every row must have the same generator layout."""
    shapes = {(layout.vision_grid, layout.sound_len, layout.action_len) for layout in layouts}
    if len(shapes) != 1:
        raise ValueError(f"batch rows must share one generator layout, got {sorted(shapes)}")
    return np.stack([layout.position_ids[:, layout.und_len :] for layout in layouts])

"""`PreparedRequest`: what the pipeline decides host-side about one request before any compute."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """Everything decided host-side before any compute: mode, geometry, latent layout, prompt ids, the
    pixels to encode for clean frames, the action rows (forward dynamics' given actions) and domain."""

    mode: str
    num_frames: int
    height: int
    width: int
    fps: float
    latent_shape: tuple[int, int, int]
    clean_frames: tuple[int, ...]
    cond_ids: list[int]
    uncond_ids: list[int]
    use_cfg: bool
    pixels: np.ndarray | None  # [3, F', H, W] frames to encode for the clean latent frames
    latent_crop: tuple[int, int] | None  # action canvas: keep latent [:h, :w]
    sound_len: int
    action_len: int
    clean_action_rows: tuple[int, ...]
    action_x0: np.ndarray | None  # [chunk, action_dim]
    raw_action_dim: int | None
    domain_id: int | None

"""Pixel-side conditioning for generation, as `Cosmos3OmniPipeline` prepares it (docs/model.md, "Conditioning per mode").

Everything here is host-side numpy on RGB frames; outputs are float32 channels-first in [-1, 1]:
  - `conditioning_image`: image→video / image conditioning: resize to cover (bilinear, antialiased), centre crop;
  - `video_frames`: video→video frames, each resized straight to (H, W) with PIL bilinear;
  - `action_clip`: the action canvas: frames floored to multiples of 16, the resolution bin of the tier, content
    scaled down (never up, bicubic antialiased) and padded right/bottom (reflect, or replicate when the pad is
    at least as large as the content).
The antialiased resampler reproduces torch's CPU `interpolate(..., antialias=True)` (PIL's separable filter:
width first, then height, a dimension of unchanged size untouched; float32 weights, fused multiply-adds).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
from PIL import Image

from cosmos_jax.sampling.prompts import classify_resolution_bin

Frame = Union[Image.Image, np.ndarray]
SPATIAL_MULTIPLE = 16


def _bilinear_filter(x: np.float32) -> np.float32:
    x = abs(x)
    return np.float32(1.0) - x if x < 1.0 else np.float32(0.0)


def _bicubic_filter(x: np.float32) -> np.float32:
    """Keys' cubic convolution (a = -0.5), in torch's float32 operation order."""
    a, x = np.float32(-0.5), abs(x)
    if x < 1.0:
        return ((a + np.float32(2.0)) * x - (a + np.float32(3.0))) * x * x + np.float32(1.0)
    if x < 2.0:
        return ((a * x - np.float32(5.0) * a) * x + np.float32(8.0) * a) * x - np.float32(4.0) * a
    return np.float32(0.0)


_FILTERS: dict[str, tuple[Callable[[np.float32], np.float32], float]] = {
    "bilinear": (_bilinear_filter, 1.0),
    "bicubic": (_bicubic_filter, 2.0),
}


def _resample_taps(in_size: int, out_size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: first input index [out] and normalised float32 tap weights [out, K] (zero-padded),
    computed in float32 step by step as torch's antialiased kernels do."""
    filt, half_support = _FILTERS[kind]
    f32 = np.float32
    scale = f32(f32(in_size) / f32(out_size))
    support = f32(f32(half_support) * scale) if scale >= 1.0 else f32(half_support)
    inv_scale = f32(f32(1.0) / scale) if scale >= 1.0 else f32(1.0)
    starts, rows = [], []
    for i in range(out_size):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(center) - float(support) + 0.5), 0)
        hi = min(int(float(center) + float(support) + 0.5), in_size)
        taps, total = [], f32(0.0)
        for j in range(lo, hi):
            tap = filt(f32((float(f32(f32(j) - center)) + 0.5) * float(inv_scale)))
            taps.append(tap)
            total = f32(total + tap)
        starts.append(lo)
        rows.append([f32(t / total) for t in taps] if total != 0 else taps)
    width = max(len(r) for r in rows)
    weights = np.zeros((out_size, width), np.float32)
    for i, r in enumerate(rows):
        weights[i, : len(r)] = r
    return np.asarray(starts), weights


def _resample_last_axis(x: np.ndarray, out_size: int, kind: str) -> np.ndarray:
    """Resample the last axis; accumulation is sequential over taps with fused multiply-adds, like torch."""
    starts, weights = _resample_taps(x.shape[-1], out_size, kind)
    index = np.minimum(starts[:, None] + np.arange(weights.shape[1]), x.shape[-1] - 1)
    taps = x[..., index]  # [..., out, K]
    acc = taps[..., 0] * weights[:, 0]
    for k in range(1, weights.shape[1]):
        fused = taps[..., k].astype(np.float64) * weights[:, k].astype(np.float64) + acc.astype(np.float64)
        acc = fused.astype(np.float32)
    return acc.astype(np.float32)


def resize_antialiased(x: np.ndarray, height: int, width: int, kind: str = "bilinear") -> np.ndarray:
    """[..., h, w] float32 -> [..., height, width] like torch `interpolate(mode=kind, antialias=True)` on CPU."""
    x = np.asarray(x, np.float32)
    if x.shape[-1] != width:
        x = _resample_last_axis(x, width, kind)
    if x.shape[-2] != height:
        x = np.swapaxes(_resample_last_axis(np.swapaxes(x, -1, -2), height, kind), -1, -2)
    return np.ascontiguousarray(x)


def as_pil(frame: Frame) -> Image.Image:
    """An RGB PIL image from a PIL image or an [H, W, 3] uint8 array."""
    if isinstance(frame, Image.Image):
        return frame.convert("RGB") if frame.mode != "RGB" else frame
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"a frame must be an [H, W, 3] uint8 array or a PIL image, got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _pil_to_unit(frame: Image.Image) -> np.ndarray:
    """[3, H, W] float32 in [-1, 1] from an RGB PIL image (x/255, then 2x-1, in float32)."""
    x = np.asarray(frame, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return (np.float32(2.0) * x - np.float32(1.0)).transpose(2, 0, 1)


def conditioning_image(image: Frame, height: int, width: int) -> np.ndarray:
    """[3, height, width] float32 in [-1, 1]: scale to cover, centre-crop, round to integer levels."""
    pixels = np.asarray(as_pil(image), dtype=np.uint8).astype(np.float32).transpose(2, 0, 1)
    src_h, src_w = pixels.shape[-2:]
    scale = max(width / src_w, height / src_h)
    resized_h, resized_w = math.ceil(scale * src_h), math.ceil(scale * src_w)
    pixels = resize_antialiased(pixels, resized_h, resized_w, "bilinear")
    top, left = round((resized_h - height) / 2), round((resized_w - width) / 2)
    pixels = pixels[:, top : top + height, left : left + width]
    return (np.clip(np.round(pixels), 0, 255) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def video_frames(frames: Sequence[Frame], height: int | None = None, width: int | None = None) -> np.ndarray:
    """[3, F, H, W] float32 in [-1, 1]: each frame resized with PIL bilinear to (height, width); a size left
    None is the first frame's, floored to a multiple of 16."""
    if len(frames) == 0:
        raise ValueError("the conditioning video has no frames")
    pil = [as_pil(f) for f in frames]
    height = height if height is not None else pil[0].height // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE
    width = width if width is not None else pil[0].width // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE
    if height < 1 or width < 1:
        raise ValueError(f"conditioning frames of {pil[0].width}x{pil[0].height} are smaller than 16 pixels")
    resized = [f.resize((width, height), resample=Image.Resampling.BILINEAR) for f in pil]
    return np.stack([_pil_to_unit(f) for f in resized], axis=1)


def action_clip(frames: Sequence[Frame], tier: int, num_frames: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The action conditioning video [3, num_frames, H, W] (canvas of `tier`) and the content size (h, w).

    Short clips repeat their last frame; long ones are cut to `num_frames`.
    """
    video = video_frames(frames)
    target_h, target_w = classify_resolution_bin(video.shape[-2], video.shape[-1], tier)
    if video.shape[1] < num_frames:
        pad = np.repeat(video[:, -1:], num_frames - video.shape[1], axis=1)
        video = np.concatenate([video, pad], axis=1)
    video = video[:, :num_frames]
    frame_h, frame_w = video.shape[-2:]
    scale = min(target_w / frame_w, target_h / frame_h, 1.0)
    content_h, content_w = max(1, int(scale * frame_h + 0.5)), max(1, int(scale * frame_w + 0.5))
    if (content_h, content_w) != (frame_h, frame_w):
        video = resize_antialiased(video, content_h, content_w, "bicubic")
    pad_bottom, pad_right = target_h - content_h, target_w - content_w
    if pad_bottom or pad_right:
        mode = "edge" if pad_right >= content_w or pad_bottom >= content_h else "reflect"
        video = np.pad(video, ((0, 0), (0, 0), (0, pad_bottom), (0, pad_right)), mode=mode)
    return video.astype(np.float32), (content_h, content_w)


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image file; a clear error when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def load_video(path: str | os.PathLike) -> list[Image.Image]:
    """The frames of a video file (mp4, gif, ...) or of one image, as RGB PIL images."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    import imageio.v3 as iio

    try:
        frames = iio.imread(path, index=None)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read video {path}: {e}") from None
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"video {path} decoded to an unexpected shape {frames.shape}")
    return [Image.fromarray(f[..., :3].astype(np.uint8)) for f in frames]

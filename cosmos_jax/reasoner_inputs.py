"""Reasoner inputs, host-side: image/video preprocessing equal to the Qwen-VL processors, placeholder expansion,
and the mRoPE position ids of mixed text/vision sequences (`get_rope_index`).

Images follow `Qwen2VLImageProcessorPil` (PIL bicubic resize to multiples of patch*merge, rescale 1/255,
normalise, one frame repeated over the temporal patch). Videos use the same per-frame PIL resize with the
video size rule (`smart_resize` over frames), pad the frame count to the temporal patch by repeating the last
frame, and are expanded as one `<{t:.1f} seconds><|vision_start|>pads<|vision_end|>` span per temporal patch.
Patch rows are (C, t, h, w)-flattened, listed in 2x2 block-major order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from cosmos_jax.modeling.vision import vision_grid
from cosmos_jax.modeling.reasoner import PromptBatch, ReasonerConfig

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ProcessorSettings:
    """Resize and normalisation rules (the keys of a Qwen-VL preprocessor_config.json)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_file(cls, path: str | os.PathLike, default: "ProcessorSettings") -> "ProcessorSettings":
        """Read a preprocessor config (size.shortest_edge/longest_edge or min/max_pixels); `default` if absent."""
        if not os.path.isfile(path):
            return default
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        size = raw.get("size") or {}
        return dataclasses.replace(
            default,
            patch_size=raw.get("patch_size", default.patch_size),
            temporal_patch_size=raw.get("temporal_patch_size", default.temporal_patch_size),
            merge_size=raw.get("merge_size", default.merge_size),
            min_pixels=size.get("shortest_edge", raw.get("min_pixels", default.min_pixels)),
            max_pixels=size.get("longest_edge", raw.get("max_pixels", default.max_pixels)),
            image_mean=tuple(raw.get("image_mean", default.image_mean)),
            image_std=tuple(raw.get("image_std", default.image_std)),
        )


IMAGE_SETTINGS = ProcessorSettings()
VIDEO_SETTINGS = ProcessorSettings(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768)


@dataclasses.dataclass(frozen=True)
class VisionItem:
    """One preprocessed image or video: pixels [t*h*w, C*tp*p*p] float32, grid (t, h, w) in patches;
    timestamps (seconds, one per temporal patch) for videos."""

    kind: int
    pixels: np.ndarray
    grid: tuple[int, int, int]
    timestamps: tuple[float, ...] = ()

    def tokens_per_group(self, merge: int) -> int:
        return self.grid[1] * self.grid[2] // merge**2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 num_frames: int = 1, temporal_factor: int = 1) -> tuple[int, int]:
    """Target (height, width), multiples of `factor`, with frames*height*width within [min, max] pixels."""
    if min(height, width) < 1:
        raise ValueError(f"image of size {height}x{width} is empty")
    if num_frames > 1 and (height < factor or width < factor):
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor if num_frames > 1 else 1
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image file -> uint8 [H, W, 3]; ValueError naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class VideoClip:
    """Sampled frames uint8 [T, H, W, 3], their indices in the source video, and the source fps."""

    frames: np.ndarray
    frame_indices: tuple[int, ...]
    fps: float


def sample_frames(frames: np.ndarray, fps: float, sample_fps: float = 2.0, min_frames: int = 4,
                  max_frames: int = 768) -> VideoClip:
    """Uniformly sample `sample_fps` frames per second (Qwen3-VL's rule) from all frames [T, H, W, 3]."""
    total = frames.shape[0]
    if total == 0:
        raise ValueError("video has no frames")
    count = min(max(int(total / fps * sample_fps), min_frames), max_frames, total)
    indices = np.linspace(0, total - 1, count).round().astype(int)
    return VideoClip(frames[indices], tuple(int(i) for i in indices), float(fps))


def load_video(path: str | os.PathLike, sample_fps: float = 2.0, default_fps: float = 24.0) -> VideoClip:
    """A video file (imageio/ffmpeg), an animated image, or a folder of frame images -> sampled clip."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ValueError(f"video folder {path} holds no frame images")
        frames = np.stack([load_image(f) for f in files])
        return sample_frames(frames, default_fps, sample_fps)
    if not path.is_file():
        raise ValueError(f"video file not found: {path}")
    try:
        import imageio.v3 as iio

        frames = np.asarray(iio.imread(path))
        fps = float(iio.immeta(path).get("fps") or default_fps)
    except Exception as e:  # imageio raises many types for unreadable input
        raise ValueError(f"cannot read video {path}: {e}") from None
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"video {path} decoded to shape {frames.shape}, expected [T, H, W, 3]")
    return sample_frames(frames[..., :3].astype(np.uint8), fps, sample_fps)


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> bicubic (PIL) uint8 [height, width, 3]."""
    return np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.BICUBIC))


def _normalize(frames: np.ndarray, settings: ProcessorSettings) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W]: x/255 (in float64, then float32), then (x - mean) / std."""
    x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32).transpose(0, 3, 1, 2)
    mean = np.asarray(settings.image_mean, np.float32)[:, None, None]
    std = np.asarray(settings.image_std, np.float32)[:, None, None]
    return (x - mean) / std


def patchify(frames: np.ndarray, settings: ProcessorSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float [T, C, H, W] -> patches [gt*gh*gw, C*tp*p*p] in block-major order, grid (gt, gh, gw).
    T is padded to a multiple of the temporal patch by repeating the last frame."""
    tp, p, m = settings.temporal_patch_size, settings.patch_size, settings.merge_size
    if pad := -frames.shape[0] % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def preprocess_image(image: np.ndarray, settings: ProcessorSettings = IMAGE_SETTINGS) -> VisionItem:
    """uint8 [H, W, 3] -> a VisionItem (grid t = 1)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    height, width = smart_resize(image.shape[0], image.shape[1], settings.factor, settings.min_pixels,
                                 settings.max_pixels)
    pixels, grid = patchify(_normalize(_resize(image, height, width)[None], settings), settings)
    return VisionItem(IMAGE, pixels, grid)


def frame_timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int) -> tuple[float, ...]:
    """Seconds per temporal patch: the mean time of its first and last frame (indices padded like the frames)."""
    indices = list(indices)
    if pad := -len(indices) % temporal_patch_size:
        indices += [indices[-1]] * pad
    times = [i / fps for i in indices]
    return tuple((times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size))


def preprocess_video(clip: VideoClip, settings: ProcessorSettings = VIDEO_SETTINGS) -> VisionItem:
    """A sampled clip -> a VisionItem with one timestamp per temporal patch."""
    frames = clip.frames
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [T, H, W, 3], got shape {frames.shape}")
    if frames.shape[0] < settings.temporal_patch_size:
        raise ValueError(f"video has {frames.shape[0]} frames, needs at least {settings.temporal_patch_size}")
    height, width = smart_resize(frames.shape[1], frames.shape[2], settings.factor, settings.min_pixels,
                                 settings.max_pixels, frames.shape[0], settings.temporal_patch_size)
    resized = np.stack([_resize(f, height, width) for f in frames])
    pixels, grid = patchify(_normalize(resized, settings), settings)
    timestamps = frame_timestamps(clip.frame_indices, clip.fps, settings.temporal_patch_size)
    return VisionItem(VIDEO, pixels, grid, timestamps)


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    """One prompt after placeholder expansion: ids and token types (0 text, 1 image, 2 video), its vision items."""

    ids: tuple[int, ...]
    token_types: tuple[int, ...]
    items: tuple[VisionItem, ...] = ()


def expand_placeholders(
    ids: Sequence[int],
    items: Sequence[VisionItem],
    config: ReasonerConfig,
    encode: Callable[[str], list[int]],
) -> PreparedPrompt:
    """Replace each image placeholder token by its tokens (grid/merge^2 of them) and each
    `<|vision_start|><|video_pad|><|vision_end|>` by one timestamped span per temporal patch, taking `items`
    in order of appearance (images and videos each in their own order)."""
    if not ids:
        raise ValueError("the prompt is empty: nothing to reason about")
    merge = config.vision.spatial_merge_size if config.vision is not None else 2
    images = [it for it in items if it.kind == IMAGE]
    videos = [it for it in items if it.kind == VIDEO]
    out_ids, out_types, order = [], [], []
    i = 0
    while i < len(ids):
        token = ids[i]
        if token == config.image_token_id:
            if not images:
                raise ValueError("the prompt has more image placeholders than images given")
            item = images.pop(0)
            n = item.tokens_per_group(merge)
            out_ids += [token] * n
            out_types += [IMAGE] * n
            order.append(item)
        elif token == config.video_token_id:
            if not videos:
                raise ValueError("the prompt has more video placeholders than videos given")
            item = videos.pop(0)
            if not (out_ids and out_ids[-1] == config.vision_start_token_id and i + 1 < len(ids)
                    and ids[i + 1] == config.vision_end_token_id):
                raise ValueError("a video placeholder must be written <|vision_start|><|video_pad|><|vision_end|>")
            out_ids.pop()
            out_types.pop()
            n = item.tokens_per_group(merge)
            for seconds in item.timestamps:
                stamp = encode(f"<{seconds:.1f} seconds>")
                out_ids += stamp + [config.vision_start_token_id] + [token] * n + [config.vision_end_token_id]
                out_types += [TEXT] * (len(stamp) + 1) + [VIDEO] * n + [TEXT]
            order.append(item)
            i += 1
        else:
            out_ids.append(token)
            out_types.append(TEXT)
        i += 1
    if images or videos:
        raise ValueError(f"{len(images)} image(s) and {len(videos)} video(s) have no placeholder in the prompt")
    return PreparedPrompt(tuple(out_ids), tuple(out_types), tuple(order))


def rope_positions(prompt: PreparedPrompt, merge: int) -> tuple[np.ndarray, int]:
    """mRoPE ids [3, L] (t, h, w) and the position of the first generated token (`get_rope_index`)."""
    grids = {IMAGE: [], VIDEO: []}
    for item in prompt.items:
        t, h, w = item.grid
        grids[item.kind] += [(1, h, w)] * t if item.kind == VIDEO else [(t, h, w)]
    types = np.asarray(prompt.token_types)
    boundaries = np.flatnonzero(np.diff(types)) + 1
    pieces, counter = [], 0
    for run in np.split(np.arange(len(types)), boundaries):
        kind = int(types[run[0]])
        if kind == TEXT:
            pieces.append(np.broadcast_to(np.arange(len(run)) + counter, (3, len(run))))
            counter += len(run)
            continue
        if not grids[kind]:
            raise ValueError("more vision placeholder spans than vision items")
        t, h, w = grids[kind].pop(0)
        lh, lw = h // merge, w // merge
        if len(run) != t * lh * lw:
            raise ValueError(f"a vision span has {len(run)} placeholder tokens, its grid needs {t * lh * lw}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + counter)
        counter += max(h, w) // merge
    positions = np.concatenate(pieces, axis=1)
    return positions, int(positions.max()) + 1


def batch_prompts(prompts: Sequence[PreparedPrompt], config: ReasonerConfig, pad_id: int = 0) -> PromptBatch:
    """Left-pad prompts to a common length and gather every vision item of the batch (in order)."""
    if not prompts:
        raise ValueError("no prompts given")
    if any(not p.ids for p in prompts):
        raise ValueError("a prompt is empty: nothing to reason about")
    merge = config.vision.spatial_merge_size if config.vision is not None else 2
    length = max(len(p.ids) for p in prompts)
    batch = len(prompts)
    ids = np.full((batch, length), pad_id, np.int32)
    positions = np.zeros((batch, 3, length), np.float32)
    visual = np.full((batch, length), -1, np.int32)
    pads, next_pos, pixels, grids = [], [], [], []
    merged_offset = 0
    for b, prompt in enumerate(prompts):
        pad = length - len(prompt.ids)
        pads.append(pad)
        ids[b, pad:] = prompt.ids
        pos, nxt = rope_positions(prompt, merge)
        positions[b, :, pad:] = pos
        next_pos.append(nxt)
        types = np.asarray(prompt.token_types)
        for kind in (IMAGE, VIDEO):
            slots = np.flatnonzero(types == kind) + pad
            kind_items = [it for it in prompt.items if it.kind == kind]
            counts = [it.pixels.shape[0] // merge**2 for it in kind_items]
            if sum(counts) != len(slots):
                raise ValueError(f"prompt {b}: {len(slots)} placeholders for {sum(counts)} vision tokens")
            starts = np.cumsum([0] + counts)
            for it, start, count in zip(kind_items, starts, counts):
                visual[b, slots[start:start + count]] = merged_offset + np.arange(count)
                merged_offset += count
                pixels.append(it.pixels)
                grids.append(it.grid)
    if pixels and config.vision is None:
        raise ValueError("this reasoner has no vision encoder (text-only model), but images/video were given")
    return PromptBatch(
        input_ids=jnp.asarray(ids),
        pad=jnp.asarray(pads, jnp.int32),
        position_ids=jnp.asarray(positions),
        next_position=jnp.asarray(next_pos, jnp.float32),
        visual_index=jnp.asarray(visual),
        pixels=jnp.asarray(np.concatenate(pixels)) if pixels else None,
        grid=vision_grid(grids, config.vision) if pixels else None,
    )

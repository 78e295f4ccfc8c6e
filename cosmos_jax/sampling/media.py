"""Files people can open: mp4 (with sound muxed in), png, wav, action plots, arrays and JSON.

Every writer goes through `atomic_path`: the file is written under a temporary name in the same folder and
renamed into place only when complete, so an interrupted run never leaves a truncated output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import wave
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cosmos_jax.datasets.embodiments import EMBODIMENTS

_PLOT_COLORS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` (same suffix); rename it to `path` if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, suffix = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[..., 3] float in [0, 1] -> uint8 (x·255 rounded, as diffusers' numpy_to_pil)."""
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """One [H, W, 3] frame (float in [0, 1] or uint8)."""
    image = image if image.dtype == np.uint8 else to_uint8(image)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> None:
    """[channels, N] float in [-1, 1] -> 16-bit PCM wav."""
    pcm = np.round(np.clip(waveform, -1.0, 1.0) * 32767.0).astype("<i2")
    with atomic_path(path) as tmp:
        with wave.open(tmp, "wb") as f:
            f.setnchannels(pcm.shape[0])
            f.setsampwidth(2)
            f.setframerate(int(sample_rate))
            f.writeframes(np.ascontiguousarray(pcm.T).tobytes())


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, audio_path: str | None = None) -> None:
    """[F, H, W, 3] frames (float in [0, 1] or uint8) as H.264 mp4; `audio_path` (a wav) is muxed in as AAC."""
    import imageio_ffmpeg

    frames = frames if frames.dtype == np.uint8 else to_uint8(frames)
    height, width = frames.shape[1:3]
    extra: dict[str, Any] = {}
    if audio_path is not None:
        extra = {"audio_path": audio_path, "audio_codec": "aac"}
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            tmp, (width, height), fps=float(fps), codec="libx264", pix_fmt_out="yuv420p",
            macro_block_size=1, quality=8, ffmpeg_log_level="error", **extra,
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, np.asarray(array))


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def action_plot(actions: np.ndarray, title: str, size: tuple[int, int] = (800, 480),
                channel_names: Sequence[str] | None = None, units: str | None = None) -> Image.Image:
    """A line chart of `actions` [steps, channels]: one coloured line per channel, axes, a legend naming the
    channels (`channel_names`, else "ch i"), the y axis labelled with `units`."""
    actions = np.asarray(actions, np.float32)
    if actions.ndim != 2 or actions.shape[0] < 1 or actions.shape[1] < 1:
        raise ValueError(f"actions must be [steps, channels], got shape {actions.shape}")
    if channel_names is not None and len(channel_names) != actions.shape[1]:
        raise ValueError(f"{len(channel_names)} channel names for {actions.shape[1]} action channels")
    width, height = size
    left, right, top, bottom = 60, 130, 36, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black")
    lo, hi = float(actions.min()), float(actions.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 1.0, hi + 1.0
    steps = actions.shape[0]
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step / max(steps - 1, 1)) * plot_w
        y = top + (1.0 - (value - lo) / (hi - lo)) * plot_h
        return x, y

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        _, y = xy(0, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.2f}", fill="black")
    for step in range(steps):
        x, _ = xy(step, lo)
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill="black")
        if steps <= 20 or step % max(steps // 10, 1) == 0:
            draw.text((x - 4, top + plot_h + 8), str(step), fill="black")
    draw.text((left + plot_w // 2 - 20, height - 16), "step", fill="black")
    if units is not None:
        draw.text((4, top - 14), units, fill="black")
    for channel in range(actions.shape[1]):
        color = _PLOT_COLORS[channel % len(_PLOT_COLORS)]
        points = [xy(step, float(actions[step, channel])) for step in range(steps)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        else:
            x, y = points[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        legend_y = top + 14 * channel
        if legend_y < top + plot_h:
            draw.line([width - right + 10, legend_y + 6, width - right + 30, legend_y + 6], fill=color, width=2)
            label = f"ch {channel}" if channel_names is None else str(channel_names[channel])[:14]
            draw.text((width - right + 36, legend_y), label, fill="black")
    return image


def write_action_plot(path: str | os.PathLike, actions: np.ndarray, title: str,
                      channel_names: Sequence[str] | None = None, units: str | None = None) -> None:
    with atomic_path(path) as tmp:
        action_plot(actions, title, channel_names=channel_names, units=units).save(tmp, format="PNG")


def write_actions(stem: str, actions: np.ndarray, *, domain: str | None, mode: str,
                  normalizer: Any = None) -> list[str]:
    """`{stem}.actions.npy`, `.json` ({"mode", "domain", "space", "actions": [[...]]}) and `.png` (plot, channels
    named from the embodiment registry). With `normalizer` (a `datasets.normalization.ActionNormalizer`) the
    model-space actions are written in raw units ("space": "raw"), else as they are ("space": "model").
    Returns paths."""
    space = "model" if normalizer is None else "raw"
    if normalizer is not None:
        actions = normalizer.to_raw(actions).astype(np.float32)
    entry = EMBODIMENTS.get(domain or "")
    names = entry.channels if entry is not None and entry.raw_action_dim == np.shape(actions)[-1] else None
    paths = [f"{stem}.actions.npy", f"{stem}.actions.json", f"{stem}.actions.png"]
    write_npy(paths[0], actions)
    write_json(paths[1], {"mode": mode, "domain": domain, "space": space, "shape": list(actions.shape),
                          "channels": None if names is None else list(names),
                          "actions": np.asarray(actions, np.float64).round(6).tolist()})
    units = "raw units" if normalizer is not None else "model-normalised space"
    write_action_plot(paths[2], actions, f"{mode} actions ({domain}), {units}", channel_names=names, units=units)
    return paths


def write_video_outputs(
    stem: str, frames: np.ndarray, fps: float, sound: np.ndarray | None = None, sample_rate: int | None = None
) -> list[str]:
    """A png for one frame, else an mp4 (with a wav beside it and muxed in when there is sound). Returns paths."""
    written: list[str] = []
    wav = None
    if sound is not None:
        wav = f"{stem}.wav"
        write_wav(wav, sound, sample_rate)
        written.append(wav)
    if frames.shape[0] == 1:
        written.append(f"{stem}.png")
        write_png(written[-1], frames[0])
    else:
        written.append(f"{stem}.mp4")
        write_mp4(written[-1], frames, fps, audio_path=wav)
    return written


def output_stem(path: str | os.PathLike, suffixes: Sequence[str] = (".mp4", ".png", ".npy")) -> str:
    """`out/clip.mp4` -> `out/clip` (one known suffix stripped); outputs are named from this stem."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    return root if ext.lower() in suffixes else path

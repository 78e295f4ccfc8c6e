"""Input media for `generate` and `reason`: one reader for images and clips, naming the flag and file on bad input.

A clip is an mp4 (or anything ffmpeg decodes), a folder of PNG/JPEG frames (sorted by name, numbers compared as
numbers: frame2 before frame10), or a `.npy` array [T, H, W, 3] of uint8, or of floats in [0, 1] (rounded to
uint8 levels as x·255). The folder and the `.npy` of the same frames give the same uint8 array, so lossless input
reaches the model unchanged. Images and frames must be at least MIN_SIDE pixels on each side.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_SIDE = 16


@dataclasses.dataclass(frozen=True)
class Clip:
    """frames uint8 [T, H, W, 3]; fps of the source (None for frame folders and arrays, which carry none)."""

    frames: np.ndarray
    fps: float | None


def _check_size(height: int, width: int, flag: str, path: str | os.PathLike) -> None:
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"{flag} {path}: {width}x{height} pixels is too small; images and frames must be at "
                         f"least {MIN_SIDE}x{MIN_SIDE}")


def read_image(path: str | os.PathLike, flag: str = "--image") -> np.ndarray:
    """An RGB image file -> uint8 [H, W, 3]."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: file not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{flag} {path}: cannot read as an image ({e.__class__.__name__})") from None
    _check_size(*array.shape[:2], flag, path)
    return array


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _read_folder(path: Path, flag: str) -> np.ndarray:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")),
                   key=_natural_key)
    if not files:
        raise ValueError(f"{flag} {path}: the folder holds no {'/'.join(FRAME_SUFFIXES)} frames")
    frames = [read_image(f, flag) for f in files]
    for f, frame in zip(files, frames):
        if frame.shape != frames[0].shape:
            raise ValueError(f"{flag} {f}: frame is {frame.shape[1]}x{frame.shape[0]}, but {files[0].name} is "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]}; all frames must have one size")
    return np.stack(frames)


def _read_npy(path: Path, flag: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{flag} {path}: the file holds pickled Python objects, which are never loaded; save a "
                             "plain numeric array (np.save of a uint8 or float array)") from None
        raise ValueError(f"{flag} {path}: not a readable .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{flag} {path}: not a readable .npy array ({e})") from None
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise ValueError(f"{flag} {path}: expected frames [T, H, W, 3], got shape {list(array.shape)}")
    if array.dtype == np.uint8:
        frames = array
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{flag} {path}: float frames must be finite and in [0, 1]")
        frames = np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"{flag} {path}: frames must be uint8 or float in [0, 1], got {array.dtype}")
    _check_size(*frames.shape[1:3], flag, path)
    return frames


def _read_video_file(path: Path, flag: str) -> Clip:
    import imageio.v3 as iio

    try:
        frames = np.asarray(iio.imread(path, index=None))
        fps = iio.immeta(path).get("fps")
    except Exception as e:  # imageio and ffmpeg raise many types; the last line of ffmpeg's output says why
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(e).__name__
        raise ValueError(f"{flag} {path}: cannot decode as a video ({reason[:200]})") from None
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4) or frames.shape[0] < 1:
        raise ValueError(f"{flag} {path}: decoded to shape {list(frames.shape)}, expected frames [T, H, W, 3]")
    frames = frames[..., :3].astype(np.uint8)
    _check_size(*frames.shape[1:3], flag, path)
    return Clip(frames, float(fps) if fps else None)


def read_clip(path: str | os.PathLike, flag: str = "--video") -> Clip:
    """A video file, a folder of frames or a .npy [T, H, W, 3] -> Clip; ValueError naming `flag` and the path."""
    path = Path(path)
    if path.is_dir():
        return Clip(_read_folder(path, flag), None)
    if not path.is_file():
        raise ValueError(f"{flag}: no such file or folder: {path}")
    if path.suffix.lower() == ".npy":
        return Clip(_read_npy(path, flag), None)
    return _read_video_file(path, flag)


def read_array(path: str | os.PathLike, flag: str) -> np.ndarray:
    """A .npy of real numbers (float or integer) -> float32; never unpickles. ValueError naming `flag` and file."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{flag} {path}: the file holds pickled Python objects, which are never loaded; save a "
                             "plain float array with np.save") from None
        raise ValueError(f"{flag} {path}: not a readable .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{flag} {path}: not a readable .npy array ({e})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        kind = type(array).__name__ if not isinstance(array, np.ndarray) else array.dtype
        raise ValueError(f"{flag} {path}: expected a real float or integer array, got {kind}")
    return array.astype(np.float32)

"""mp4 video through PyAV (the `av` package, which bundles its own FFmpeg): encode, concatenate, probe, decode.

Episodes are encoded one at a time into a complete mp4 (H.264 `libx264` or AV1 `libsvtav1`, yuv420p, a short
GOP so that seeking is cheap), then appended to a growing multi-episode file by stream copy (`Mp4Appender`,
no re-encode): each episode's packets are shifted by the duration already in the file, so episode e occupies
[from_timestamp, from_timestamp + length / fps) seconds of it. `decode_frames` seeks to a timestamp (the
key frame at or before it) and decodes forward, matching every decoded frame to its frame number by its
presentation time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ImportError("video files need PyAV: pip install av") from None
    return av


@dataclasses.dataclass(frozen=True)
class VideoEncoding:
    """Encoder settings: codec (libsvtav1, LeRobot's default, or libx264), pixel format, GOP (key frame every
    `gop` frames), constant rate factor `crf` (lower: better quality, larger files) and a preset (None: the
    codec's default, or 12 for libsvtav1, as LeRobot records)."""

    codec: str = "libsvtav1"
    pix_fmt: str = "yuv420p"
    gop: int = 2
    crf: int = 30
    preset: int | str | None = None

    @property
    def resolved_preset(self) -> int | str | None:
        return 12 if self.preset is None and self.codec == "libsvtav1" else self.preset

    def options(self) -> dict[str, str]:
        options = {"g": str(self.gop), "crf": str(self.crf)}
        if self.resolved_preset is not None:
            options["preset"] = str(self.resolved_preset)
        return options


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def encode_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: float, encoding: VideoEncoding) -> None:
    """Write `frames` [N, H, W, 3] uint8 (N >= 1, H and W even) as an mp4 of N frames at `fps`."""
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be [N >= 1, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if encoding.codec == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration per file at its default level
    if encoding.pix_fmt == "yuv420p" and (height % 2 or width % 2):
        raise ValueError(f"yuv420p needs an even frame size, got {height}x{width}")
    with av.open(os.fspath(path), "w", format="mp4") as container:
        stream = container.add_stream(encoding.codec, rate=_rate(fps), options=encoding.options())
        stream.width, stream.height, stream.pix_fmt = width, height, encoding.pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))


def video_info(path: str | os.PathLike[str], encoding: VideoEncoding) -> dict[str, Any]:
    """A LeRobot camera feature's `info`: the stream's `video.*` entries probed from the file, then the encoder
    settings (`video.g`, `video.crf`, `video.preset`, ...) and `is_depth_map`, as LeRobot records them."""
    av = _av()
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        info: dict[str, Any] = {
            "video.height": stream.height, "video.width": stream.width,
            "video.codec": stream.codec_context.codec.canonical_name, "video.pix_fmt": stream.pix_fmt,
            "video.fps": int(stream.base_rate), "video.channels": 3, "has_audio": bool(container.streams.audio)}
    info.update({"video.g": encoding.gop, "video.crf": encoding.crf, "video.preset": encoding.resolved_preset,
                 "video.fast_decode": 0, "video.extra_options": {}, "video.video_backend": "pyav",
                 "is_depth_map": False})
    return info


class Mp4Appender:
    """One multi-episode mp4 grown by stream copy: `append(episode_mp4, frames)` adds a complete single-episode
    mp4 (same encoder settings) after what the file already holds and returns its (from, to) timestamps in
    seconds; `bytes` counts the packet bytes muxed so far; `close()` finishes the file."""

    def __init__(self, path: str | os.PathLike[str], fps: float) -> None:
        self.path = Path(path)
        self._fps = _rate(fps)
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0
        self.bytes = 0

    def append(self, episode_mp4: str | os.PathLike[str], frames: int) -> tuple[float, float]:
        av = _av()
        start = Fraction(self.frames) / self._fps
        with av.open(os.fspath(episode_mp4)) as source:
            stream_in = source.streams.video[0]
            if self._container is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._container = av.open(os.fspath(self.path), "w", format="mp4", options={"movflags": "faststart"})
                self._stream = self._container.add_stream_from_template(stream_in, opaque=True)
                self._stream.time_base = stream_in.time_base
            shift = round(start / stream_in.time_base)
            for packet in source.demux(stream_in):
                if packet.dts is None:
                    continue
                packet.pts += shift
                packet.dts += shift
                packet.stream = self._stream
                self.bytes += packet.size
                self._container.mux(packet)
        self.frames += frames
        return float(start), float(Fraction(self.frames) / self._fps)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def decode_frames(path: str | os.PathLike[str], start_s: float, count: int, fps: float,
                  tolerance_s: float = 1e-4, keep: Sequence[int] | None = None) -> np.ndarray:
    """[len(keep), H, W, 3] uint8: the frames at `start_s + i / fps` for i in `keep` (default: 0 .. count-1).

    Seeks to the key frame at or before `start_s` and decodes forward through all `count` frames (only those
    in `keep` are converted to RGB); ValueError naming the file and the frame numbers missing when the file
    ends (or its timestamps stop matching within `tolerance_s`) first.
    """
    av = _av()
    wanted = set(range(count) if keep is None else keep)
    frames: dict[int, np.ndarray] = {}
    seen: set[int] = set()
    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            target = max(int(start_s / stream.time_base) - 1, 0)
            container.seek(target, backward=True, any_frame=False, stream=stream)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                offset = (float(frame.pts * stream.time_base) - start_s) * fps
                number = round(offset)
                if number >= count:
                    break
                if number >= 0 and abs(offset - number) <= tolerance_s * fps:
                    seen.add(number)
                    if number in wanted:
                        frames[number] = frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode ({e})") from None
    missing = [i for i in range(count) if i not in seen]
    if missing:
        raise ValueError(f"{path}: no frame at {len(missing)} of the {count} timestamps from {start_s:.4f} s at "
                         f"{fps:g} fps (frames {missing[:4]}{' ...' if len(missing) > 4 else ''}): the video is "
                         "shorter than the episode")
    return np.stack([frames[i] for i in (range(count) if keep is None else keep)])


def decode_some(path: str | os.PathLike[str], keep: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
    """({frame number: [H, W, 3] uint8} for the frames in `keep`, the file's frame count), decoding it all."""
    av = _av()
    wanted, frames, count = set(keep), {}, 0
    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for count, frame in enumerate(container.decode(stream), 1):
                if count - 1 in wanted:
                    frames[count - 1] = frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode ({e})") from None
    return frames, count


def decode_all(path: str | os.PathLike[str]) -> np.ndarray:
    """[N, H, W, 3] uint8: every frame of an mp4 in presentation order."""
    av = _av()
    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode ({e})") from None
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames)

"""LeRobot v2.x dataset -> cosmos-jax training data (`cosmos_jax.training.data` format).

Source layout read here (LeRobot codebase v2.0 / v2.1, one parquet file and one mp4 per camera per episode):

    meta/info.json       {"fps", "chunks_size", "data_path", "video_path", "features", "total_episodes", ...};
                         data_path  e.g. "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                         video_path e.g. "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
                         episode_chunk = episode_index // chunks_size; features[key] = {"dtype", "shape", ...}
                         ("video" dtype for cameras, the action feature's shape is [A]).
    meta/episodes.jsonl  {"episode_index", "tasks": [str, ...], "length"} per line
    meta/tasks.jsonl     {"task_index", "task"} per line
    data/...parquet      one row per frame: `frame_index` (0..N-1), `episode_index`, `task_index`, the action column
    videos/...mp4        the episode's frames of one camera, N frames at `fps`

Each episode is cut into clips of `frames` = 1+4k frames on a uniform time grid (the source frame rate, or
`fps` when resampling down): clip c holds grid frames [c·stride, c·stride + frames). Every frame is scaled to
cover (H, W), centre-cropped and rounded to integer levels (`sampling.conditioning.conditioning_image`, the
same as image conditioning at inference), the clips are encoded with the Wan VAE (posterior mean, normalised
with the VAE's latent statistics: what the transformer sees) in fixed-size batches (one compile per shape),
and written with the clip's caption ids, its `frames − 1` action rows (the row of each grid frame except the
last: the transition from it to the next one) and the embodiment domain id.

Bad episodes (missing parquet or video, video frame count ≠ parquet rows, non-contiguous frame_index,
non-finite actions, wrong action width, no task text, empty caption) raise `BadEpisode` naming the episode
index, or, with `skip_bad`, are reported in `PrepareReport.bad_episodes` and skipped. Output is written to a
temporary folder beside `dst` and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cosmos_jax.modeling.wan_vae import (
    FRAMES_PER_LATENT,
    WanVAEConfig,
    encode,
    latent_frames,
    normalize_latents,
)
from cosmos_jax.sampling.conditioning import conditioning_image
from cosmos_jax.training.data import DatasetMeta, write_dataset, write_sample

Tokenize = Callable[[str], Sequence[int]]


class BadEpisode(ValueError):
    """An episode that cannot be prepared; the message names its index."""

    def __init__(self, episode: int, reason: str) -> None:
        super().__init__(f"bad episode {episode}: {reason}")
        self.episode = episode
        self.reason = reason


# ------------------------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class LeRobotInfo:
    """meta/info.json: frame rate, path templates, chunking, and the feature table."""

    root: Path
    fps: float
    chunks_size: int
    data_path: str
    video_path: str | None
    features: dict[str, Any]
    total_episodes: int | None = None

    @property
    def video_keys(self) -> list[str]:
        return [k for k, v in self.features.items() if isinstance(v, dict) and v.get("dtype") == "video"]

    def feature_width(self, key: str) -> int:
        """The width A of a 1-D feature (shape [A])."""
        if key not in self.features:
            raise ValueError(f"{self.root}/meta/info.json has no feature {key!r}; features: {sorted(self.features)}")
        shape = self.features[key].get("shape")
        if not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int) or shape[0] <= 0:
            raise ValueError(f"{self.root}/meta/info.json: feature {key!r} must have shape [A], got {shape!r}")
        return shape[0]

    def _format(self, template: str, episode: int, video_key: str | None) -> Path:
        """A path template filled with episode_chunk, episode_index, total_episodes and video_key."""
        fields = {"episode_chunk": episode // self.chunks_size, "episode_index": episode,
                  "total_episodes": self.total_episodes, "video_key": video_key}
        try:
            return self.root / template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{self.root}/meta/info.json: cannot fill path template {template!r} ({e!r}); "
                             f"known fields: {sorted(fields)}") from None

    def parquet_path(self, episode: int) -> Path:
        return self._format(self.data_path, episode, None)

    def video_file(self, episode: int, video_key: str) -> Path:
        if self.video_path is None:
            raise ValueError(f"{self.root}/meta/info.json has no video_path (a dataset without videos)")
        return self._format(self.video_path, episode, video_key)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: not a LeRobot v2 dataset") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")  # noqa: TRY004 (bad file content, not a bad argument)
    return value


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"{path} is missing: not a LeRobot v2 dataset")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not valid JSON ({e})") from None
    return rows


def read_info(root: str | os.PathLike[str]) -> LeRobotInfo:
    """Parse meta/info.json; ValueError naming the file and key when it is not a v2.x layout."""
    root = Path(root)
    path = root / "meta" / "info.json"
    raw = _read_json(path)
    version = str(raw.get("codebase_version", ""))
    if not version.startswith("v2"):
        raise ValueError(f"{path}: codebase_version {version!r} is not supported (LeRobot v2.x layouts only)")
    missing = [k for k in ("fps", "chunks_size", "data_path", "features") if k not in raw]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    fps, chunks = raw["fps"], raw["chunks_size"]
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"{path}: fps must be a positive number, got {fps!r}")
    if not isinstance(chunks, int) or chunks <= 0:
        raise ValueError(f"{path}: chunks_size must be a positive int, got {chunks!r}")
    total = raw.get("total_episodes")
    return LeRobotInfo(root, float(fps), chunks, str(raw["data_path"]), raw.get("video_path"), dict(raw["features"]),
                       total if isinstance(total, int) else None)


@dataclasses.dataclass(frozen=True)
class Episode:
    index: int
    length: int
    tasks: tuple[str, ...]


def read_episodes(root: str | os.PathLike[str]) -> list[Episode]:
    """meta/episodes.jsonl in file order."""
    path = Path(root) / "meta" / "episodes.jsonl"
    episodes = []
    for number, row in enumerate(_read_jsonl(path), 1):
        try:
            episodes.append(Episode(int(row["episode_index"]), int(row["length"]), tuple(row.get("tasks") or ())))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} line {number}: needs integer episode_index and length ({e})") from None
    return episodes


def read_tasks(root: str | os.PathLike[str]) -> dict[int, str]:
    """meta/tasks.jsonl -> {task_index: task text} (empty when the file is absent)."""
    path = Path(root) / "meta" / "tasks.jsonl"
    if not path.is_file():
        return {}
    tasks = {}
    for number, row in enumerate(_read_jsonl(path), 1):
        try:
            tasks[int(row["task_index"])] = str(row["task"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} line {number}: needs task_index and task ({e})") from None
    return tasks


# ------------------------------------------------------------------------------------------- one episode


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading LeRobot parquet files needs pyarrow: pip install 'cosmos-jax[lerobot]'") from None
    return pq


@dataclasses.dataclass(frozen=True)
class EpisodeTable:
    """The parquet columns used here: actions [N, A] float32 (None when not read), task_index [N] (or None)."""

    actions: np.ndarray | None
    task_index: np.ndarray | None
    rows: int


def read_episode_table(info: LeRobotInfo, episode: int, action_key: str | None) -> EpisodeTable:
    """Read and check one episode's parquet: frame_index 0..N-1, episode_index, finite actions of the
    feature's width. Raises BadEpisode."""
    path = info.parquet_path(episode)
    if not path.is_file():
        raise BadEpisode(episode, f"parquet file {path} is missing")
    try:
        table = _pyarrow_parquet().read_table(path)
    except (OSError, ValueError) as e:
        raise BadEpisode(episode, f"cannot read {path}: {e}") from None
    names = set(table.column_names)
    rows = table.num_rows
    if "frame_index" in names:
        frame_index = np.asarray(table.column("frame_index").to_numpy(), np.int64)
        if not np.array_equal(frame_index, np.arange(rows)):
            raise BadEpisode(episode, f"frame_index is not 0..{rows - 1} in order")
    if "episode_index" in names:
        stored = np.unique(np.asarray(table.column("episode_index").to_numpy(), np.int64))
        if stored.tolist() != [episode]:
            raise BadEpisode(episode, f"{path} holds episode_index {stored.tolist()}")
    actions = None
    if action_key is not None:
        if action_key not in names:
            raise BadEpisode(episode, f"{path} has no {action_key!r} column")
        width = info.feature_width(action_key)
        try:
            actions = np.asarray(table.column(action_key).to_pylist(), np.float32)
        except (TypeError, ValueError):
            raise BadEpisode(episode, f"{action_key!r} rows are not equal-length numbers") from None
        if actions.shape != (rows, width):
            raise BadEpisode(episode, f"{action_key!r} has shape {list(actions.shape)}, expected [{rows}, {width}] "
                                      "(wrong action width)")
        bad = np.flatnonzero(~np.isfinite(actions).all(axis=1))
        if bad.size:
            raise BadEpisode(episode, f"{action_key!r} is not finite in frame(s) {bad[:8].tolist()}")
    task_index = np.asarray(table.column("task_index").to_numpy(), np.int64) if "task_index" in names else None
    return EpisodeTable(actions, task_index, rows)


def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, 3] uint8 -> [height, width, 3] uint8: scale to cover, centre-crop, round (as image conditioning)."""
    unit = conditioning_image(frame, height, width)
    return np.round((unit.transpose(1, 2, 0) + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8)


def read_video(path: Path, episode: int, height: int, width: int, keep: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """({frame number: [height, width, 3] uint8} for the frames in `keep`, the video's frame count)."""
    if not path.is_file():
        raise BadEpisode(episode, f"video file {path} is missing")
    import imageio.v3 as iio

    frames, count = {}, 0
    try:
        for count, frame in enumerate(iio.imiter(path), 1):
            if count - 1 in keep:
                frames[count - 1] = fit_frame(np.asarray(frame)[..., :3], height, width)
    except (OSError, ValueError, RuntimeError) as e:
        raise BadEpisode(episode, f"cannot decode {path}: {e}") from None
    return frames, count


def grid_step(source_fps: float, frames: int, stride: int, fps: float | None) -> float:
    """Source frames per grid frame; ValueError for a frame count that is not 1+4k, a stride < 1 or an fps
    outside (0, source_fps]."""
    if frames < 1 or (frames - 1) % FRAMES_PER_LATENT:
        raise ValueError(f"frames must be 1 + {FRAMES_PER_LATENT}k, got {frames}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    fps = source_fps if fps is None else fps
    if not 0 < fps <= source_fps:
        raise ValueError(f"fps must be in (0, {source_fps}] (the source rate; no upsampling), got {fps}")
    return source_fps / fps


def clip_indices(length: int, source_fps: float, frames: int, stride: int, fps: float | None = None) -> list[np.ndarray]:
    """Source frame numbers of every clip that fits in `length` frames, each [frames] int.

    Clips lie on a grid at `fps` (default: the source rate; resampling only goes down): grid frame g is source
    frame round(g · source_fps / fps); clip c covers grid frames c·stride ... c·stride + frames − 1.
    """
    step = grid_step(source_fps, frames, stride, fps)
    clips = []
    start = 0
    while True:
        grid = np.arange(start, start + frames)
        indices = np.floor(grid * step + 0.5).astype(np.int64)
        if indices[-1] >= length:
            return clips
        clips.append(indices)
        start += stride


# ------------------------------------------------------------------------------------------- preparation


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What to cut and how: clip `frames` (1+4k) every `stride` grid frames (default: `frames`, no overlap),
    at `fps` (None: the source rate), `height` x `width` pixels from camera `video_key` (None: the only one),
    actions from column `action_key` (None: a video-only dataset) with embodiment `domain`; `batch_size`
    clips per VAE call."""

    frames: int = 17
    height: int = 256
    width: int = 256
    video_key: str | None = None
    stride: int | None = None
    fps: float | None = None
    action_key: str | None = "action"
    domain: int = 0
    batch_size: int = 4
    skip_bad: bool = False


@dataclasses.dataclass
class PrepareReport:
    """Samples written, episodes used, (index, reason) of each skipped bad episode, the indexes of good episodes
    too short for one clip, and the longest caption (train with max_text_len >= it)."""

    samples: int = 0
    episodes: int = 0
    bad_episodes: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    short_episodes: list[int] = dataclasses.field(default_factory=list)
    max_caption_len: int = 0


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def encode_normalised(params: Any, video: jax.Array, config: WanVAEConfig, dtype: Any) -> jax.Array:
    """[B, 3, F, H, W] in [-1, 1] -> normalised posterior mean [B, z, T, H/16, W/16] in `dtype` (compiled once
    per config, shape and dtype in a process)."""
    mu = encode(params, video, config, dtype)
    return normalize_latents(mu, config.latents_mean, config.latents_std, dtype)


class ClipEncoder:
    """Batches of clips [n <= batch_size, 3, F, H, W] -> normalised latents; every batch is zero-padded to
    batch_size so one compiled function serves every call."""

    def __init__(self, vae_config: WanVAEConfig, vae_params: Any, batch_size: int, dtype: Any = jnp.float32) -> None:
        self._config, self._params, self._batch_size, self._dtype = vae_config, vae_params, batch_size, jnp.dtype(dtype)

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        """[n, 3, F, H, W] -> [n, z, T, H/16, W/16] float32."""
        n = clips.shape[0]
        padded = np.zeros((self._batch_size, *clips.shape[1:]), np.float32)
        padded[:n] = clips
        latents = encode_normalised(self._params, jnp.asarray(padded, self._dtype), self._config, self._dtype)
        return np.asarray(latents.astype(jnp.float32))[:n]


def _check_config(config: PrepareConfig, vae_config: WanVAEConfig, size_multiple: int, info: LeRobotInfo,
                  action_dim: int | None, num_domains: int | None) -> tuple[str, int | None]:
    """(video key, action width) after checking the config against the VAE, the model and the dataset."""
    if config.height <= 0 or config.width <= 0 or config.height % size_multiple or config.width % size_multiple:
        raise ValueError(f"size {config.height}x{config.width}: height and width must be positive multiples of "
                         f"{size_multiple} (VAE spatial compression {vae_config.spatial_compression} x latent patch)")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    grid_step(info.fps, config.frames, config.stride or config.frames, config.fps)
    keys = info.video_keys
    key = config.video_key
    if key is None:
        if len(keys) != 1:
            raise ValueError(f"the dataset has video keys {keys}: choose one with video_key (--video-key)")
        key = keys[0]
    elif key not in keys:
        raise ValueError(f"video key {key!r} is not a video feature of {info.root}; video keys: {keys}")
    width = None
    if config.action_key is not None:
        width = info.feature_width(config.action_key)
        if action_dim is not None and width > action_dim:
            raise ValueError(f"action width {width} ({config.action_key!r}) is wider than the model's action input "
                             f"(action_dim {action_dim}; 0 when the model has no action head)")
        if num_domains is not None and not 0 <= config.domain < num_domains:
            raise ValueError(f"domain {config.domain} is outside the model's [0, {num_domains})")
        if num_domains is None and config.domain < 0:
            raise ValueError(f"domain must be >= 0, got {config.domain}")
    return key, width


@dataclasses.dataclass(frozen=True)
class Clip:
    """One sample before encoding: frames [F, H, W, 3] uint8, caption ids [L] int32, actions [F-1, A] or None."""

    sample_id: str
    frames: np.ndarray
    caption_ids: np.ndarray
    actions: np.ndarray | None


def clip_pixels(clips: Sequence[Clip]) -> np.ndarray:
    """[n, 3, F, H, W] float32 in [-1, 1] (x / 127.5 − 1, as the pipeline scales pixels)."""
    frames = np.stack([c.frames for c in clips]).astype(np.float32)
    return (frames / np.float32(127.5) - np.float32(1.0)).transpose(0, 4, 1, 2, 3)


def _caption(episode: Episode, table: EpisodeTable, first_frame: int, tasks: dict[int, str]) -> str:
    if table.task_index is not None and int(table.task_index[first_frame]) in tasks:
        return tasks[int(table.task_index[first_frame])]
    if episode.tasks:
        return episode.tasks[0]
    raise BadEpisode(episode.index, f"no task text for frame {first_frame} (task_index not in meta/tasks.jsonl "
                                    "and no tasks in meta/episodes.jsonl)")


def episode_clips(info: LeRobotInfo, episode: Episode, tasks: dict[int, str], config: PrepareConfig,
                  video_key: str, tokenize: Tokenize) -> list[Clip]:
    """Every clip of one episode, checked; raises BadEpisode."""
    table = read_episode_table(info, episode.index, config.action_key)
    if table.rows != episode.length:
        raise BadEpisode(episode.index, f"parquet has {table.rows} rows, meta/episodes.jsonl says {episode.length}")
    indices = clip_indices(table.rows, info.fps, config.frames, config.stride or config.frames, config.fps)
    keep = {int(i) for clip in indices for i in clip}
    frames, count = read_video(info.video_file(episode.index, video_key), episode.index, config.height,
                               config.width, keep)
    if count != table.rows:
        raise BadEpisode(episode.index, f"video {video_key!r} has {count} frames, the parquet has {table.rows} rows")
    clips = []
    for number, clip in enumerate(indices):
        text = _caption(episode, table, int(clip[0]), tasks)
        ids = np.asarray(list(tokenize(text)), np.int32)
        if ids.size == 0:
            raise BadEpisode(episode.index, f"task text {text!r} tokenizes to no tokens")
        actions = None if table.actions is None else table.actions[clip[:-1]]
        clips.append(Clip(f"ep{episode.index:06d}_clip{number:04d}", np.stack([frames[int(i)] for i in clip]), ids,
                          actions))
    return clips


def _batches(items: Iterator[Clip], size: int) -> Iterator[list[Clip]]:
    batch: list[Clip] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_lerobot(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    vae_config: WanVAEConfig,
    vae_params: Any,
    tokenize: Tokenize,
    config: PrepareConfig,
    *,
    latent_patch_size: int = 1,
    action_dim: int | None = None,
    num_domains: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    vae_dtype: Any = jnp.float32,
) -> PrepareReport:
    """Prepare a LeRobot v2.x dataset folder `src` into `dst` (written to a temporary folder, then renamed).

    latent_patch_size / action_dim / num_domains come from the model to train (sizes must be multiples of
    VAE compression x latent_patch_size; action width <= action_dim; domain < num_domains); the VAE computes in
    `vae_dtype` and the latents are stored as float32.
    Returns the counts and the (episode, reason) of every skipped episode.
    """
    info = read_info(src)
    size_multiple = vae_config.spatial_compression * latent_patch_size
    video_key, width = _check_config(config, vae_config, size_multiple, info, action_dim, num_domains)
    episodes = read_episodes(src)
    tasks = read_tasks(src)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        report, entries = _write_all(info, episodes, tasks, config, video_key, tokenize,
                                     ClipEncoder(vae_config, vae_params, config.batch_size, vae_dtype), tmp,
                                     progress)
        if report.samples == 0:
            raise ValueError(f"{src}: no clip of {config.frames} frames could be made from any episode "
                             f"({len(report.bad_episodes)} bad)")
        s = vae_config.spatial_compression
        meta = DatasetMeta((vae_config.z_dim, latent_frames(config.frames), config.height // s, config.width // s),
                           float(config.fps or info.fps), None if width is None else config.frames - 1, width)
        write_dataset(str(tmp), meta, entries)
        if dst.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report


def _write_all(info: LeRobotInfo, episodes: list[Episode], tasks: dict[int, str], config: PrepareConfig,
               video_key: str, tokenize: Tokenize, encoder: ClipEncoder, out: Path,
               progress: bool) -> tuple[PrepareReport, list[dict[str, str]]]:
    """Encode and write every clip of every good episode under `out`; (report, index entries)."""
    report, entries = PrepareReport(), []
    bar = tqdm(episodes, disable=not progress, desc="episodes", unit="ep")

    def clips() -> Iterator[Clip]:
        for episode in bar:
            try:
                found = episode_clips(info, episode, tasks, config, video_key, tokenize)
            except BadEpisode as e:
                if not config.skip_bad:
                    raise
                tqdm.write(f"skipping {e}", file=sys.stderr)
                report.bad_episodes.append((e.episode, e.reason))
                continue
            if not found:
                report.short_episodes.append(episode.index)
            report.episodes += 1
            yield from found

    for batch in _batches(clips(), config.batch_size):
        latents = encoder(clip_pixels(batch))
        for clip, z in zip(batch, latents):
            entries.append(write_sample(str(out), clip.sample_id, z, clip.caption_ids, clip.actions,
                                        None if clip.actions is None else config.domain))
            report.max_caption_len = max(report.max_caption_len, int(clip.caption_ids.size))
    bar.close()
    report.samples = len(entries)
    return report, entries

"""A LeRobot dataset (v3.0 or v2.x, `lerobot_reader`) -> cosmos-jax training data (`cosmos_jax.training.data`).

Each episode is cut into clips of `frames` = 1+4k frames on a uniform time grid (the source frame rate, or
`fps` when resampling down): clip c holds grid frames [c·stride, c·stride + frames). Every frame is scaled to
cover (H, W), centre-cropped and rounded to integer levels (`sampling.conditioning.conditioning_image`, the
same as image conditioning at inference), the clips are encoded with the Wan VAE (posterior mean, normalised
with the VAE's latent statistics: what the transformer sees) in fixed-size batches (one compile per shape),
and written with the clip's caption ids, its `frames − 1` action rows and the embodiment domain id. Action
row j is the transition from grid frame j to j + 1: for absolute and target actions the source row at grid
frame j, for delta actions the sum of the source rows from grid frame j up to (not including) grid frame
j + 1. Clips come from one chosen camera, or from every camera (each camera's clips are samples of their own).
Beside the samples, `action_stats.json` (`normalization`) holds the per-channel stats of the action rows
written, in raw units, for the domain.

Bad episodes (missing or unreadable parquet or video, video shorter than its rows, data columns that disagree
with the features, non-contiguous frame_index, non-finite actions, wrong action width, no task text, empty
caption, an episode missing from the episode metadata) raise `BadEpisode` naming the episode index and the
file, or, with `skip_bad`, are reported in `PrepareReport.bad_episodes` and skipped. Output is written to a
temporary folder beside `dst` and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import functools
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

from cosmos_jax.datasets.embodiments import ACTION_KINDS, names_of_domain_id, width_of_domain_id
from cosmos_jax.datasets.lerobot_episode import BadEpisode, Episode, EpisodeTable
from cosmos_jax.datasets.lerobot_reader import open_lerobot
from cosmos_jax.datasets.lerobot_stats import feature_stats
from cosmos_jax.datasets.lerobot_v2 import LeRobotV2
from cosmos_jax.datasets.lerobot_v3 import LeRobotV3
from cosmos_jax.datasets.normalization import STATS_FILE, ActionNormalizer, write_normalizer
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


Source = LeRobotV2 | LeRobotV3


# ------------------------------------------------------------------------------------------- one episode


def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, 3] uint8 -> [height, width, 3] uint8: scale to cover, centre-crop, round (as image conditioning)."""
    unit = conditioning_image(frame, height, width)
    return np.round((unit.transpose(1, 2, 0) + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8)


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
    at `fps` (None: the source rate), `height` x `width` pixels from camera `video_key` (None: the only one;
    `all_cameras`: every camera, each as its own clips), actions from column `action_key` (None: a video-only
    dataset) of kind `action_kind` (absolute, target or delta) with embodiment `domain`; `batch_size` clips
    per VAE call."""

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
    all_cameras: bool = False
    action_kind: str = "absolute"


@dataclasses.dataclass
class PrepareReport:
    """Samples written, episodes used, (index, reason) of each skipped bad episode, the indexes of good episodes
    too short for one clip, the longest caption (train with max_text_len >= it) and the stats file written."""

    samples: int = 0
    episodes: int = 0
    bad_episodes: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    short_episodes: list[int] = dataclasses.field(default_factory=list)
    max_caption_len: int = 0
    stats_file: str | None = None


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


def _check_config(config: PrepareConfig, vae_config: WanVAEConfig, size_multiple: int, source: Source,
                  action_dim: int | None, num_domains: int | None) -> tuple[list[str], int | None]:
    """(camera keys, action width) after checking the config against the VAE, the model and the dataset."""
    if config.height <= 0 or config.width <= 0 or config.height % size_multiple or config.width % size_multiple:
        raise ValueError(f"size {config.height}x{config.width}: height and width must be positive multiples of "
                         f"{size_multiple} (VAE spatial compression {vae_config.spatial_compression} x latent patch)")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.action_kind not in ACTION_KINDS:
        raise ValueError(f"action_kind must be one of {list(ACTION_KINDS)}, got {config.action_kind!r}")
    grid_step(source.fps, config.frames, config.stride or config.frames, config.fps)
    keys = source.video_keys
    if config.all_cameras:
        if config.video_key is not None:
            raise ValueError("give video_key (--video-key) or all_cameras (--all-cameras), not both")
        if not keys:
            raise ValueError(f"{source.root} has no camera (video) feature")
        chosen = list(keys)
    elif config.video_key is None:
        if len(keys) != 1:
            raise ValueError(f"the dataset has video keys {keys}: choose one with video_key (--video-key) or "
                             "use all_cameras (--all-cameras)")
        chosen = list(keys)
    elif config.video_key not in keys:
        raise ValueError(f"video key {config.video_key!r} is not a video feature of {source.root}; video keys: {keys}")
    else:
        chosen = [config.video_key]
    width = None
    if config.action_key is not None:
        width = source.feature_width(config.action_key)
        if action_dim is not None and width > action_dim:
            raise ValueError(f"action width {width} ({config.action_key!r}) is wider than the model's action input "
                             f"(action_dim {action_dim}; 0 when the model has no action head)")
        if num_domains is not None and not 0 <= config.domain < num_domains:
            raise ValueError(f"domain {config.domain} is outside the model's [0, {num_domains})")
        if num_domains is None and config.domain < 0:
            raise ValueError(f"domain must be >= 0, got {config.domain}")
        expected = width_of_domain_id(config.domain)
        if expected is not None and expected != width:
            raise ValueError(f"action width {width} ({config.action_key!r}) does not fit domain {config.domain} "
                             f"({', '.join(names_of_domain_id(config.domain))}: {expected} channels)")
    return chosen, width


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


def _caption(episode: Episode, table: EpisodeTable, first_frame: int, tasks: dict[int, str], source: str) -> str:
    if table.task_index is not None and int(table.task_index[first_frame]) in tasks:
        return tasks[int(table.task_index[first_frame])]
    if episode.tasks:
        return episode.tasks[0]
    raise BadEpisode(episode.index, f"no task text for frame {first_frame} (task_index not in {source} "
                                    "and no tasks in the episode metadata)")


def clip_actions(actions: np.ndarray, clip: np.ndarray, kind: str) -> np.ndarray:
    """[F-1, A] action rows of a clip of source frames `clip` [F]: the row at each grid frame but the last
    (absolute, target), or the sum of the rows from each grid frame up to the next one (delta)."""
    if kind != "delta":
        return actions[clip[:-1]]
    sums = np.concatenate([np.zeros((1, actions.shape[1]), np.float64), np.cumsum(actions, 0, dtype=np.float64)])
    return (sums[clip[1:]] - sums[clip[:-1]]).astype(np.float32)


def episode_clips(source: Source, episode: Episode, config: PrepareConfig, video_keys: Sequence[str],
                  tokenize: Tokenize) -> list[Clip]:
    """Every clip of one episode (per camera in `video_keys`), checked; raises BadEpisode."""
    table = source.read_table(episode, config.action_key)
    if table.rows != episode.length:
        raise BadEpisode(episode.index, f"parquet has {table.rows} rows, {source.episodes_source} says "
                                        f"{episode.length}")
    indices = clip_indices(table.rows, source.fps, config.frames, config.stride or config.frames, config.fps)
    keep = sorted({int(i) for clip in indices for i in clip})
    clips = []
    for key in video_keys:
        decoded = source.read_frames(episode, key, table.rows, keep=keep)
        frames = {i: fit_frame(frame, config.height, config.width) for i, frame in zip(keep, decoded)}
        suffix = "" if len(video_keys) == 1 and not config.all_cameras else f"_{key}"
        for number, clip in enumerate(indices):
            text = _caption(episode, table, int(clip[0]), source.tasks, source.tasks_source)
            ids = np.asarray(list(tokenize(text)), np.int32)
            if ids.size == 0:
                raise BadEpisode(episode.index, f"task text {text!r} tokenizes to no tokens")
            actions = None if table.actions is None else clip_actions(table.actions, clip, config.action_kind)
            clips.append(Clip(f"ep{episode.index:06d}_clip{number:04d}{suffix}",
                              np.stack([frames[int(i)] for i in clip]), ids, actions))
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


def _action_stats(config: PrepareConfig, rows: list[np.ndarray]) -> ActionNormalizer | None:
    """The quantile normaliser of the action rows written, for a registry domain with a fixed width."""
    names = names_of_domain_id(config.domain)
    if config.action_key is None or not rows or width_of_domain_id(config.domain) is None:
        return None
    return ActionNormalizer(names[0], "quantile", config.action_kind, config.action_key,
                            feature_stats(np.concatenate(rows)))


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
    """Prepare a LeRobot v3.0 or v2.x dataset folder `src` into `dst` (a temporary folder, then renamed).

    latent_patch_size / action_dim / num_domains come from the model to train (sizes must be multiples of
    VAE compression x latent_patch_size; action width <= action_dim; domain < num_domains); the VAE computes in
    `vae_dtype` and the latents are stored as float32.
    Returns the counts and the (episode, reason) of every skipped episode.
    """
    source = open_lerobot(src)
    size_multiple = vae_config.spatial_compression * latent_patch_size
    video_keys, width = _check_config(config, vae_config, size_multiple, source, action_dim, num_domains)
    if source.problems and not config.skip_bad:
        raise BadEpisode(*source.problems[0])
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        report, entries, rows = _write_all(source, config, video_keys, tokenize,
                                           ClipEncoder(vae_config, vae_params, config.batch_size, vae_dtype), tmp,
                                           progress)
        report.bad_episodes = sorted([*source.problems, *report.bad_episodes])
        if report.samples == 0:
            raise ValueError(f"{src}: no clip of {config.frames} frames could be made from any episode "
                             f"({len(report.bad_episodes)} bad)")
        s = vae_config.spatial_compression
        meta = DatasetMeta((vae_config.z_dim, latent_frames(config.frames), config.height // s, config.width // s),
                           float(config.fps or source.fps), None if width is None else config.frames - 1, width)
        write_dataset(str(tmp), meta, entries)
        normalizer = _action_stats(config, rows)
        if normalizer is not None:
            write_normalizer(tmp / STATS_FILE, normalizer)
            report.stats_file = str(dst / STATS_FILE)
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


def _write_all(source: Source, config: PrepareConfig, video_keys: Sequence[str], tokenize: Tokenize,
               encoder: ClipEncoder, out: Path, progress: bool
               ) -> tuple[PrepareReport, list[dict[str, str]], list[np.ndarray]]:
    """Encode and write every clip of every good episode under `out`; (report, index entries, action rows)."""
    report, entries, rows = PrepareReport(), [], []
    bar = tqdm(source.episodes, disable=not progress, desc="episodes", unit="ep")

    def clips() -> Iterator[Clip]:
        for episode in bar:
            try:
                found = episode_clips(source, episode, config, video_keys, tokenize)
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
            if clip.actions is not None:
                rows.append(clip.actions)
    bar.close()
    report.samples = len(entries)
    return report, entries, rows

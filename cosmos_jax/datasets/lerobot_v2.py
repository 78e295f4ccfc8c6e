"""Read LeRobot v2.0 / v2.1 datasets: one parquet file and one mp4 per camera per episode.

    meta/info.json       {"fps", "chunks_size", "data_path", "video_path", "features", "total_episodes", ...};
                         data_path  e.g. "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                         video_path e.g. "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
                         episode_chunk = episode_index // chunks_size; features[key] = {"dtype", "shape", ...}
                         ("video" dtype for cameras, the action feature's shape is [A]).
    meta/episodes.jsonl  {"episode_index", "tasks": [str, ...], "length"} per line
    meta/tasks.jsonl     {"task_index", "task"} per line
    data/...parquet      one row per frame: `frame_index` (0..N-1), `episode_index`, `task_index`, the action column
    videos/...mp4        the episode's frames of one camera, N frames at `fps`
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_jax.datasets.lerobot_episode import BadEpisode, Episode, EpisodeTable, column_array, pyarrow_parquet
from cosmos_jax.datasets.video import decode_some


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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; ValueError naming the file when it is missing or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: not a LeRobot dataset") from None
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
    raw = read_json(path)
    version = str(raw.get("codebase_version", ""))
    if not version.startswith("v2"):
        raise ValueError(f"{path}: codebase_version {version!r} is not a v2.x layout")
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


def read_episode_table(info: LeRobotInfo, episode: int, action_key: str | None) -> EpisodeTable:
    """Read and check one episode's parquet: frame_index 0..N-1, episode_index, finite actions of the
    feature's width. Raises BadEpisode."""
    path = info.parquet_path(episode)
    if not path.is_file():
        raise BadEpisode(episode, f"parquet file {path} is missing")
    try:
        table = pyarrow_parquet().read_table(path)
    except (OSError, ValueError) as e:
        raise BadEpisode(episode, f"cannot read {path}: {e}") from None
    names = set(table.column_names)
    rows = table.num_rows
    if "frame_index" in names:
        frame_index = np.asarray(table.column("frame_index").to_numpy(), np.int64)
        if not np.array_equal(frame_index, np.arange(rows)):
            raise BadEpisode(episode, f"{path}: frame_index is not 0..{rows - 1} in order")
    if "episode_index" in names:
        stored = np.unique(np.asarray(table.column("episode_index").to_numpy(), np.int64))
        if stored.tolist() != [episode]:
            raise BadEpisode(episode, f"{path} holds episode_index {stored.tolist()}")
    actions = None
    if action_key is not None:
        if action_key not in names:
            raise BadEpisode(episode, f"{path} has no {action_key!r} column")
        actions = column_array(table, action_key, info.feature_width(action_key), episode, path)
    task_index = np.asarray(table.column("task_index").to_numpy(), np.int64) if "task_index" in names else None
    return EpisodeTable(actions, task_index, rows)


class LeRobotV2:
    """A v2.x dataset folder: its info, episodes (meta/episodes.jsonl order), tasks, and per-episode reads."""

    version = "v2"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.info = read_info(root)
        self.root = self.info.root
        self.fps = self.info.fps
        self.features = self.info.features
        self.video_keys = self.info.video_keys
        self.episodes = read_episodes(root)
        self.tasks = read_tasks(root)
        self.problems: list[tuple[int, str]] = []
        self.tasks_source = "meta/tasks.jsonl"
        self.episodes_source = "meta/episodes.jsonl"

    def feature_width(self, key: str) -> int:
        return self.info.feature_width(key)

    def read_table(self, episode: Episode, action_key: str | None) -> EpisodeTable:
        return read_episode_table(self.info, episode.index, action_key)

    def read_frames(self, episode: Episode, video_key: str, rows: int, keep: Sequence[int] | None = None
                    ) -> np.ndarray:
        """[len(keep), H, W, 3] uint8: frames `keep` (default: all) of the episode's mp4; BadEpisode when it is
        missing, unreadable or not `rows` frames long."""
        path = self.info.video_file(episode.index, video_key)
        if not path.is_file():
            raise BadEpisode(episode.index, f"video file {path} is missing")
        keep = list(range(rows)) if keep is None else list(keep)
        try:
            frames, count = decode_some(path, keep)
        except (OSError, ValueError) as e:
            raise BadEpisode(episode.index, f"cannot decode {path}: {e}") from None
        if count != rows:
            raise BadEpisode(episode.index, f"video {video_key!r} has {count} frames, the parquet has {rows} rows "
                                            f"({path})")
        return np.stack([frames[i] for i in keep])

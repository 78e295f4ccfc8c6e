"""Read LeRobot v3.0 datasets (the layout of lerobot 0.6.1, described in `lerobot_layout`).

Checked on opening (ValueError naming the file): info.json's required fields; the episode rows, which must
hold episode_index 0..N-1 in order (lerobot finds episode e at row e, so a gap or a reordering makes it read
the wrong episode silently): rows out of order are an error, and each index missing from the sequence is
recorded in `problems` (the episodes present are read through their own rows); the task strings, which
lerobot keeps as the pandas index of meta/tasks.parquet (a table without them is an error; a plain "task"
column is read too, although lerobot would take the row numbers for the task text).
Checked per episode (BadEpisode naming the episode and the file): a data file that cannot be read, whose
columns differ from the declared features (lerobot refuses a file with an undeclared column), whose rows
for the episode are not its dataset_from_index .. dataset_to_index with frame_index 0..N-1; a camera file
that lacks frames inside the episode's timestamps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_jax.datasets import lerobot_layout as layout
from cosmos_jax.datasets.lerobot_episode import BadEpisode, Episode, EpisodeTable, column_array, pyarrow_parquet
from cosmos_jax.datasets.lerobot_stats import Stats, stats_from_json
from cosmos_jax.datasets.lerobot_v2 import read_json
from cosmos_jax.datasets.video import decode_frames

_REQUIRED = ("fps", "features", "data_path", "chunks_size", "total_episodes")


def _read_parquet(path: Path) -> Any:
    try:
        return pyarrow_parquet().read_table(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _episode_rows(table: Any, episode: int) -> Any:
    """The rows of `table` whose episode_index is `episode`, in file order."""
    mask = np.asarray(table.column("episode_index").to_numpy()) == episode
    return table.filter(mask)


def _read_episode_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one episodes file without their stats/ columns (as lerobot loads them)."""
    try:
        names = pyarrow_parquet().read_schema(path).names
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    try:
        table = pyarrow_parquet().read_table(path, columns=[n for n in names if not n.startswith("stats/")])
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    return table.to_pylist()


def read_tasks_parquet(path: Path) -> dict[int, str]:
    """meta/tasks.parquet -> {task_index: task}; the strings are the pandas index (stored as column "task"
    or as the column pandas' metadata names as its index)."""
    table = _read_parquet(path)
    names = table.column_names
    key = "task" if "task" in names else None
    metadata = (table.schema.metadata or {}).get(b"pandas")
    if key is None and metadata is not None:
        index = [c for c in json.loads(metadata).get("index_columns", []) if isinstance(c, str)]
        key = index[0] if index else None
    if key is None or "task_index" not in names:
        raise ValueError(f"{path}: needs a task_index column and the task strings as its pandas index "
                         f"(lerobot reads them as the index); columns: {names}")
    texts, indices = table.column(key).to_pylist(), table.column("task_index").to_pylist()
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{path}: the task index {key!r} must hold strings")
    return {int(i): t for i, t in zip(indices, texts)}


class LeRobotV3:
    """A v3.0 dataset folder: info, stats, tasks, episode rows, and per-episode reads."""

    version = "v3"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        info_path = self.root / layout.INFO_PATH
        self.raw_info = read_json(info_path)
        version = str(self.raw_info.get("codebase_version", ""))
        missing = [k for k in _REQUIRED if k not in self.raw_info]
        if missing:
            raise ValueError(f"{info_path} (codebase_version {version}) lacks {missing}")
        fps = self.raw_info["fps"]
        if not isinstance(fps, (int, float)) or fps <= 0:
            raise ValueError(f"{info_path}: fps must be a positive number, got {fps!r}")
        self.fps = float(fps)
        if not isinstance(self.raw_info["features"], dict) or not isinstance(self.raw_info["total_episodes"], int):
            raise ValueError(f"{info_path}: features must be an object and total_episodes an integer")
        self.features: dict[str, Any] = dict(self.raw_info["features"])
        self.video_keys = [k for k, v in self.features.items() if isinstance(v, dict) and v.get("dtype") == "video"]
        self.data_keys = [k for k, v in self.features.items() if isinstance(v, dict) and v.get("dtype") != "video"]
        if self.video_keys and not self.raw_info.get("video_path"):
            raise ValueError(f"{info_path}: cameras {self.video_keys} but no video_path")
        self.tasks_source = layout.TASKS_PATH
        self.tasks = read_tasks_parquet(self.root / layout.TASKS_PATH)
        stats_path = self.root / layout.STATS_PATH
        self.stats: dict[str, Stats] | None = (stats_from_json(read_json(stats_path), str(stats_path))
                                               if stats_path.is_file() else None)
        self.episodes_source = layout.EPISODES_DIR
        self.problems: list[tuple[int, str]] = []
        self.rows: dict[int, dict[str, Any]] = {}
        self.episodes = self._read_episodes(int(self.raw_info["total_episodes"]))
        self._cache: tuple[Path, Any] | None = None

    def _read_episodes(self, total: int) -> list[Episode]:
        paths = sorted((self.root / layout.EPISODES_DIR).glob("*/*.parquet"))
        if not paths:
            raise ValueError(f"{self.root / layout.EPISODES_DIR} holds no chunk-XXX/file-XXX.parquet")
        episodes, position = [], 0
        for path in paths:
            for number, row in enumerate(_read_episode_rows(path)):
                try:
                    episode = Episode(int(row["episode_index"]), int(row["length"]), tuple(row.get("tasks") or ()))
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}: an episode row needs integer episode_index and length ({e})") from None
                if episode.index < position:
                    raise ValueError(f"{path} row {number}: episode {episode.index} after episode {position - 1}: "
                                     "episode rows must be in episode order (lerobot finds episode e at row e)")
                for gap in range(position, episode.index):
                    self.problems.append((gap, f"{path}: episode {gap} is missing from the episode rows (the next "
                                               f"row is episode {episode.index}; lerobot finds episode e at row e)"))
                position = episode.index + 1
                self.rows[episode.index] = row
                episodes.append(episode)
        if position != total:
            self.problems.append((position, f"{self.root / layout.INFO_PATH}: total_episodes is {total}, the "
                                            f"episode rows end at episode {position - 1}"))
        return episodes

    def feature_width(self, key: str) -> int:
        """The width A of a 1-D feature (shape [A])."""
        if key not in self.features:
            raise ValueError(f"{self.root / layout.INFO_PATH} has no feature {key!r}; features: "
                             f"{sorted(self.features)}")
        shape = self.features[key].get("shape")
        if not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int) or shape[0] <= 0:
            raise ValueError(f"{self.root / layout.INFO_PATH}: feature {key!r} must have shape [A], got {shape!r}")
        return shape[0]

    def _path(self, template_key: str, episode: int, **fields: Any) -> Path:
        template = str(self.raw_info[template_key])
        try:
            return self.root / template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise BadEpisode(episode, f"{self.root / layout.INFO_PATH}: cannot fill {template_key} {template!r} "
                                      f"({e!r})") from None

    def _row_field(self, episode: int, key: str) -> Any:
        row = self.rows[episode]
        if row.get(key) is None:
            raise BadEpisode(episode, f"its row in {self.root / layout.EPISODES_DIR} has no {key!r}")
        return row[key]

    def data_file(self, episode: int) -> Path:
        return self._path("data_path", episode, chunk_index=int(self._row_field(episode, "data/chunk_index")),
                          file_index=int(self._row_field(episode, "data/file_index")))

    def video_file(self, episode: int, video_key: str) -> Path:
        prefix = f"videos/{video_key}/"
        return self._path("video_path", episode, video_key=video_key,
                          chunk_index=int(self._row_field(episode, prefix + "chunk_index")),
                          file_index=int(self._row_field(episode, prefix + "file_index")))

    def _data_table(self, episode: int) -> tuple[Path, Any]:
        path = self.data_file(episode)
        if self._cache is not None and self._cache[0] == path:
            return self._cache
        if not path.is_file():
            raise BadEpisode(episode, f"data file {path} is missing")
        try:
            table = pyarrow_parquet().read_table(path)
        except (OSError, ValueError) as e:
            raise BadEpisode(episode, f"cannot read {path}: {e}") from None
        columns, declared = set(table.column_names), {*self.data_keys, *layout.FRAME_FEATURES}
        undeclared, absent = sorted(columns - declared), sorted(declared - columns)
        if undeclared or absent:
            raise BadEpisode(episode, f"{path}: columns disagree with {self.root / layout.INFO_PATH} features: "
                                      f"undeclared {undeclared} (lerobot refuses such a file), missing {absent}")
        self._cache = (path, table)
        return self._cache

    def read_table(self, episode: Episode, action_key: str | None) -> EpisodeTable:
        """One episode's rows, checked; raises BadEpisode naming the file."""
        path, table = self._data_table(episode.index)
        rows = _episode_rows(table, episode.index)
        start = int(self._row_field(episode.index, "dataset_from_index"))
        stop = int(self._row_field(episode.index, "dataset_to_index"))
        if rows.num_rows != episode.length or stop - start != episode.length:
            raise BadEpisode(episode.index, f"{path} holds {rows.num_rows} rows of it, its episode row says length "
                                            f"{episode.length} (index {start}..{stop})")
        index = np.asarray(rows.column("index").to_numpy(), np.int64)
        if not np.array_equal(index, np.arange(start, stop)):
            raise BadEpisode(episode.index, f"{path}: its rows' index is not {start}..{stop - 1} in order")
        if not np.array_equal(np.asarray(rows.column("frame_index").to_numpy(), np.int64), np.arange(rows.num_rows)):
            raise BadEpisode(episode.index, f"{path}: frame_index is not 0..{rows.num_rows - 1} in order")
        actions = None
        if action_key is not None:
            actions = column_array(rows, action_key, self.feature_width(action_key), episode.index, path)
        return EpisodeTable(actions, np.asarray(rows.column("task_index").to_numpy(), np.int64), rows.num_rows)

    def read_frames(self, episode: Episode, video_key: str, rows: int, keep: Sequence[int] | None = None
                    ) -> np.ndarray:
        """[len(keep), H, W, 3] uint8: frames `keep` (default: all `rows`) at the episode's timestamps in its
        camera file; BadEpisode naming the file when any of the `rows` timestamps has no frame."""
        path = self.video_file(episode.index, video_key)
        if not path.is_file():
            raise BadEpisode(episode.index, f"video file {path} is missing")
        start = float(self._row_field(episode.index, f"videos/{video_key}/from_timestamp"))
        try:
            return decode_frames(path, start, rows, self.fps, keep=keep)
        except (OSError, ValueError) as e:
            raise BadEpisode(episode.index, str(e)) from None

    def episode_frames(self, episode: Episode, video_key: str) -> np.ndarray:
        return self.read_frames(episode, video_key, episode.length)

    def episode_columns(self, episode: Episode, keys: list[str]) -> dict[str, np.ndarray]:
        """{key: [N, A] in the feature's dtype} of one episode's declared data columns."""
        _, table = self._data_table(episode.index)
        rows = _episode_rows(table, episode.index)
        out = {}
        for key in keys:
            dtype = np.dtype(self.features.get(key, layout.FRAME_FEATURES.get(key, {})).get("dtype", "float64"))
            out[key] = np.asarray(rows.column(key).to_pylist(), dtype)
        return out

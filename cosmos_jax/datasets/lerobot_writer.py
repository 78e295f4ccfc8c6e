"""Write a LeRobot v3.0 dataset (the layout of lerobot 0.6.1, see `lerobot_layout`), one episode at a time.

    features = {"action": vector_feature(["x", "y"]), "observation.state": vector_feature(["x", "y"]),
                "observation.images.top": video_feature(96, 96)}
    with LeRobotWriter(dst, fps=10, features=features, robot_type="pusht") as writer:
        writer.add_episode(task="push the T", columns={"action": a, "observation.state": s},
                           frames={"observation.images.top": rgb}, episode_columns={"seed": 3})

Everything is written under a temporary folder beside `dst` and renamed into place by `finalize()` (called
by the `with` block when it ends without an exception; an exception removes the temporary folder), so `dst`
never holds a half-written dataset. Episodes get indices 0, 1, ... in the order they are added; tasks get
indices in the order they first appear. Each camera's frames are encoded through PyAV (`video.encode_mp4`)
and appended to the camera's current mp4 by stream copy. Per-episode stats go into the episodes rows, the
dataset's into meta/stats.json (`lerobot_stats`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_jax.datasets import lerobot_layout as layout
from cosmos_jax.datasets.lerobot_stats import Stats, feature_stats, image_stats, merge_stats, stats_to_json
from cosmos_jax.datasets.video import Mp4Appender, VideoEncoding, encode_mp4, video_info

_NUMERIC_DTYPES = ("float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def vector_feature(names: Sequence[str], dtype: str = "float32", info: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """A per-frame vector feature [len(names)] (actions, state), named channel by channel."""
    feature: dict[str, Any] = {"dtype": dtype, "shape": [len(names)], "names": list(names)}
    if info:
        feature["info"] = dict(info)
    return feature


def video_feature(height: int, width: int) -> dict[str, Any]:
    """A camera stored as mp4 video, frames [height, width, 3]."""
    return {"dtype": "video", "shape": [height, width, 3], "names": list(layout.VIDEO_NAMES)}


def _parquet() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("LeRobot datasets need pyarrow: pip install 'cosmos-jax[lerobot]'") from None
    return pa, pq


def _check_features(features: Mapping[str, Mapping[str, Any]]) -> None:
    for key, feature in features.items():
        if key in layout.FRAME_FEATURES:
            raise ValueError(f"feature {key!r} is written by the writer itself; declare only data and cameras")
        dtype, shape = feature.get("dtype"), feature.get("shape")
        if dtype == "video":
            if not (isinstance(shape, list) and len(shape) == 3 and shape[2] == 3):
                raise ValueError(f"camera feature {key!r} must have shape [height, width, 3], got {shape!r}")
        elif dtype in _NUMERIC_DTYPES:
            if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1):
                raise ValueError(f"feature {key!r} must have shape [A] (A >= 1), got {shape!r}")
            names = feature.get("names")
            if names is not None and len(names) != shape[0]:
                raise ValueError(f"feature {key!r}: {len(names)} names for shape {shape}")
        else:
            raise ValueError(f"feature {key!r}: dtype {dtype!r} is not one of video, {', '.join(_NUMERIC_DTYPES)}")


class LeRobotWriter:
    """Appends episodes to a new LeRobot v3.0 dataset at `root`; `finalize()` writes the metadata and moves it
    into place. `features` declares the data columns ([A] vectors) and the cameras (`video_feature`); the
    frame columns (timestamp, frame_index, episode_index, index, task_index) are added. File-size limits are
    in MB (fractions allowed); `overwrite` replaces an existing `root` at finalize."""

    def __init__(self, root: str | os.PathLike[str], *, fps: int, features: Mapping[str, Mapping[str, Any]],
                 robot_type: str | None = None, encoding: VideoEncoding | None = None,
                 chunks_size: int = layout.DEFAULT_CHUNK_SIZE,
                 data_files_size_in_mb: float = layout.DEFAULT_DATA_FILE_SIZE_IN_MB,
                 video_files_size_in_mb: float = layout.DEFAULT_VIDEO_FILE_SIZE_IN_MB,
                 overwrite: bool = False) -> None:
        if not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive int (LeRobot stores an integer rate), got {fps!r}")
        if chunks_size < 1 or data_files_size_in_mb <= 0 or video_files_size_in_mb <= 0:
            raise ValueError("chunks_size and the file-size limits must be positive")
        _check_features(features)
        self.root = Path(root)
        if self.root.exists() and not overwrite:
            raise FileExistsError(f"{self.root} exists (pass overwrite=True / --overwrite to replace it)")
        self.fps = fps
        self.features = {k: json.loads(json.dumps(v)) for k, v in features.items()}
        self.video_keys = [k for k, v in self.features.items() if v["dtype"] == "video"]
        self.data_keys = [k for k, v in self.features.items() if v["dtype"] != "video"]
        self.robot_type = robot_type
        self.encoding = encoding or VideoEncoding()
        self.chunks_size = chunks_size
        self.data_limit = data_files_size_in_mb
        self.video_limit = video_files_size_in_mb
        self.overwrite = overwrite
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.tmp-", dir=self.root.parent))
        self._scratch = self._tmp / ".scratch"
        self._scratch.mkdir()
        self._tasks: dict[str, int] = {}
        self._rows: list[dict[str, Any]] = []
        self._episode_keys: list[str] | None = None
        self._numeric: dict[str, list[np.ndarray]] = {k: [] for k in [*self.data_keys, *layout.FRAME_FEATURES]}
        self._camera_stats: dict[str, list[Stats]] = {k: [] for k in self.video_keys}
        self._frames = 0
        self._data: dict[str, Any] = {"writer": None, "chunk": 0, "file": -1, "frames": 0, "path": None}
        self._videos: dict[str, dict[str, Any]] = {k: {"appender": None, "chunk": 0, "file": -1}
                                                    for k in self.video_keys}
        self._done = False

    # ----------------------------------------------------------------------------------------- episodes

    @property
    def total_episodes(self) -> int:
        return len(self._rows)

    def _columns(self, columns: Mapping[str, Any], frames: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        episode = len(self._rows)
        unknown = sorted(set(columns) - set(self.data_keys)) + sorted(set(frames) - set(self.video_keys))
        missing = sorted(set(self.data_keys) - set(columns)) + sorted(set(self.video_keys) - set(frames))
        if unknown or missing:
            raise ValueError(f"episode {episode}: columns/frames must match the features; undeclared {unknown}, "
                             f"missing {missing}")
        arrays: dict[str, np.ndarray] = {}
        lengths = set()
        for key in self.data_keys:
            feature = self.features[key]
            values = np.asarray(columns[key])
            width = feature["shape"][0]
            if values.ndim == 1 and width == 1:
                values = values[:, None]
            if values.ndim != 2 or values.shape[1] != width:
                raise ValueError(f"episode {episode}: {key!r} must be [N, {width}], got {list(values.shape)}")
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                raise ValueError(f"episode {episode}: {key!r} is not finite in rows "
                                 f"{np.flatnonzero(~np.isfinite(values).all(1))[:8].tolist()}")
            arrays[key] = values.astype(feature["dtype"])
            lengths.add(values.shape[0])
        for key in self.video_keys:
            height, width, _ = self.features[key]["shape"]
            values = np.asarray(frames[key])
            if values.dtype != np.uint8 or values.shape[1:] != (height, width, 3):
                raise ValueError(f"episode {episode}: camera {key!r} frames must be [N, {height}, {width}, 3] uint8, "
                                 f"got {list(values.shape)} {values.dtype}")
            arrays[key] = values
            lengths.add(values.shape[0])
        if len(lengths) != 1 or min(lengths) < 1:
            raise ValueError(f"episode {episode}: every column and camera needs the same number N >= 1 of frames, "
                             f"got {sorted(lengths)}")
        return arrays, lengths.pop()

    def _task_indices(self, task: str | Sequence[str], length: int) -> tuple[np.ndarray, list[str]]:
        per_frame = [task] * length if isinstance(task, str) else list(task)
        if len(per_frame) != length or not all(isinstance(t, str) and t for t in per_frame):
            raise ValueError(f"episode {len(self._rows)}: task must be a non-empty string or one per frame "
                             f"({length})")
        for text in per_frame:
            self._tasks.setdefault(text, len(self._tasks))
        return np.array([self._tasks[t] for t in per_frame], np.int64), list(dict.fromkeys(per_frame))

    def add_episode(self, *, task: str | Sequence[str], columns: Mapping[str, Any],
                    frames: Mapping[str, Any] | None = None,
                    episode_columns: Mapping[str, Any] | None = None) -> int:
        """Append one episode; returns its index.

        task: its text (or one per frame); columns: {data feature: [N, A] (or [N] for A = 1)};
        frames: {camera: [N, H, W, 3] uint8}; episode_columns: extra per-episode values (numbers, strings or
        lists of them) stored in its episodes row; every episode must give the same keys.
        """
        if self._done:
            raise RuntimeError("the dataset is finalised")
        arrays, length = self._columns(columns, frames or {})
        extra = dict(episode_columns or {})
        reserved = [k for k in extra if k in layout.episode_columns(self.video_keys) or k.startswith(("stats/",
                                                                                                        "meta/"))]
        if reserved:
            raise ValueError(f"episode_columns {reserved} are LeRobot's own episode columns")
        if self._episode_keys is None:
            self._episode_keys = list(extra)
        elif list(extra) != self._episode_keys:
            raise ValueError(f"episode {len(self._rows)}: episode_columns {list(extra)} differ from the first "
                             f"episode's {self._episode_keys}")
        task_index, tasks = self._task_indices(task, length)
        episode = len(self._rows)
        frame_index = np.arange(length, dtype=np.int64)
        arrays.update({"timestamp": (frame_index / self.fps).astype(np.float32), "frame_index": frame_index,
                       "episode_index": np.full(length, episode, np.int64),
                       "index": np.arange(self._frames, self._frames + length, dtype=np.int64),
                       "task_index": task_index})
        row: dict[str, Any] = {"episode_index": episode, "tasks": tasks, "length": length}
        row.update(self._write_data(arrays, length))
        for key in self.video_keys:
            row.update(self._write_video(key, arrays[key], episode))
        row.update(extra)
        for key in [*self.data_keys, *self.video_keys, *layout.FRAME_FEATURES]:
            if key in self.video_keys:
                stats = image_stats(arrays[key])
                self._camera_stats[key].append(stats)
            else:
                stats = feature_stats(arrays[key])
                self._numeric[key].append(arrays[key])
            for name in layout.STAT_KEYS:
                row[f"stats/{key}/{name}"] = stats[name].tolist()
        self._rows.append(row)
        self._frames += length
        return episode

    def _write_data(self, arrays: Mapping[str, np.ndarray], length: int) -> dict[str, int]:
        pa, pq = _parquet()
        fields, values = [], []
        for key in [*self.data_keys, *layout.FRAME_FEATURES]:
            feature = self.features.get(key) or layout.FRAME_FEATURES[key]
            kind = pa.from_numpy_dtype(np.dtype(feature["dtype"]))
            column = arrays[key]
            if feature["shape"] == [1]:
                array = pa.array(column.reshape(length), kind)
                fields.append(pa.field(key, kind))
            else:
                array = pa.FixedSizeListArray.from_arrays(pa.array(column.reshape(-1), kind), feature["shape"][0])
                fields.append(pa.field(key, pa.list_(kind, feature["shape"][0])))
            values.append(array)
        table = pa.Table.from_arrays(values, schema=pa.schema(fields))
        state = self._data
        if state["writer"] is not None:
            size = os.path.getsize(state["path"])
            if size + size / state["frames"] * length >= self.data_limit * 2**20:
                state["writer"].close()
                state["writer"] = None
        if state["writer"] is None:
            state["chunk"], state["file"] = ((0, 0) if state["file"] < 0 else
                                             layout.next_chunk_file(state["chunk"], state["file"], self.chunks_size))
            state["path"] = self._tmp / layout.DATA_PATH.format(chunk_index=state["chunk"], file_index=state["file"])
            state["path"].parent.mkdir(parents=True, exist_ok=True)
            state["writer"] = pq.ParquetWriter(state["path"], table.schema, compression="snappy")
            state["frames"] = 0
        state["writer"].write_table(table)
        state["frames"] += length
        return {"data/chunk_index": state["chunk"], "data/file_index": state["file"],
                "dataset_from_index": self._frames, "dataset_to_index": self._frames + length}

    def _write_video(self, key: str, frames: np.ndarray, episode: int) -> dict[str, Any]:
        scratch = self._scratch / f"episode-{episode:06d}.mp4"
        encode_mp4(scratch, frames, self.fps, self.encoding)
        size = os.path.getsize(scratch)
        state = self._videos[key]
        appender = state["appender"]
        if appender is not None and appender.bytes + size >= self.video_limit * 2**20:
            appender.close()
            appender = None
        if appender is None:
            state["chunk"], state["file"] = ((0, 0) if state["file"] < 0 else
                                             layout.next_chunk_file(state["chunk"], state["file"], self.chunks_size))
            path = self._tmp / layout.VIDEO_PATH.format(video_key=key, chunk_index=state["chunk"],
                                                        file_index=state["file"])
            appender = state["appender"] = Mp4Appender(path, self.fps)
        start, end = appender.append(scratch, frames.shape[0])
        scratch.unlink()
        return {f"videos/{key}/chunk_index": state["chunk"], f"videos/{key}/file_index": state["file"],
                f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": end}

    # ----------------------------------------------------------------------------------------- finalise

    def _write_episodes(self) -> None:
        pa, pq = _parquet()
        table = pa.Table.from_pylist(self._rows)
        probe = pa.BufferOutputStream()
        pq.write_table(table, probe)
        per_row = max(probe.getvalue().size / len(self._rows), 1.0)
        rows_per_file = max(1, int(self.data_limit * 2**20 / per_row))
        chunk = file = 0
        for start in range(0, len(self._rows), rows_per_file):
            part = self._rows[start: start + rows_per_file]
            for row in part:
                row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = chunk, file
            path = self._tmp / layout.EPISODES_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(part), path, compression="snappy")
            chunk, file = layout.next_chunk_file(chunk, file, self.chunks_size)

    def _write_tasks(self) -> None:
        import pandas as pd

        tasks = pd.DataFrame({"task_index": np.arange(len(self._tasks), dtype=np.int64)},
                             index=pd.Index(list(self._tasks), name="task"))
        tasks.to_parquet(self._tmp / layout.TASKS_PATH)

    def dataset_stats(self) -> dict[str, Stats]:
        """meta/stats.json's content: every numeric feature over all rows, cameras merged over episodes."""
        stats: dict[str, Stats] = {}
        for key in [*self.data_keys, *self.video_keys, *layout.FRAME_FEATURES]:
            if key in self.video_keys:
                stats[key] = merge_stats(self._camera_stats[key])
            else:
                stats[key] = feature_stats(np.concatenate(self._numeric[key]))
        return stats

    def _info(self) -> dict[str, Any]:
        features = {k: dict(v) for k, v in self.features.items()}
        for key in self.video_keys:
            first = self._tmp / layout.VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0)
            features[key]["info"] = video_info(first, self.encoding)
        features.update(json.loads(json.dumps(layout.FRAME_FEATURES)))
        return {"codebase_version": layout.CODEBASE_VERSION, "fps": self.fps, "features": features,
                "total_episodes": len(self._rows), "total_frames": self._frames, "total_tasks": len(self._tasks),
                "chunks_size": self.chunks_size, "data_files_size_in_mb": self.data_limit,
                "video_files_size_in_mb": self.video_limit, "data_path": layout.DATA_PATH,
                "video_path": layout.VIDEO_PATH if self.video_keys else None, "robot_type": self.robot_type,
                "splits": {"train": f"0:{len(self._rows)}"}}

    def finalize(self) -> Path:
        """Close the files, write meta/ and move the dataset to `root`; returns `root`."""
        if self._done:
            return self.root
        if not self._rows:
            raise ValueError(f"{self.root}: no episode was added")
        if self._data["writer"] is not None:
            self._data["writer"].close()
        for state in self._videos.values():
            state["appender"].close()
        shutil.rmtree(self._scratch)
        (self._tmp / "meta").mkdir(exist_ok=True)
        self._write_episodes()
        self._write_tasks()
        (self._tmp / layout.STATS_PATH).write_text(json.dumps(stats_to_json(self.dataset_stats()), indent=4))
        (self._tmp / layout.INFO_PATH).write_text(json.dumps(self._info(), indent=4))
        if self.root.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.root} appeared while writing (pass overwrite=True to replace it)")
            old = self._tmp.with_name(self._tmp.name + ".old")
            os.replace(self.root, old)
            os.replace(self._tmp, self.root)
            shutil.rmtree(old)
        else:
            os.replace(self._tmp, self.root)
        self._done = True
        return self.root

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._data["writer"] is not None:
            self._data["writer"].close()
            self._data["writer"] = None
        for state in self._videos.values():
            if state["appender"] is not None:
                state["appender"].close()
        self._done = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LeRobotWriter:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

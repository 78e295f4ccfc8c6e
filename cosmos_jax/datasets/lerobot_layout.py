"""The LeRobot dataset layouts: file names, path templates, default sizes and the per-frame columns.

v3.0 follows lerobot 0.6.1 (`lerobot/datasets/utils.py`, `dataset_metadata.py`, `dataset_writer.py`):

    meta/info.json                               codebase_version "v3.0", fps, features {key: {dtype, shape,
                                                 names[, info]}}, total_episodes, total_frames, total_tasks,
                                                 chunks_size, data_files_size_in_mb, video_files_size_in_mb,
                                                 data_path, video_path, robot_type, splits {"train": "0:N"}
    meta/stats.json                              {feature: {min, max, mean, std, count, q01, q10, q50, q90, q99}}
    meta/tasks.parquet                           one row per task: column task_index, the task strings as the
                                                 pandas index (named "task"); lerobot reads it with pandas
    meta/episodes/chunk-XXX/file-XXX.parquet     one row per episode, in episode order (lerobot finds the row of
                                                 episode e at position e)
    data/chunk-XXX/file-XXX.parquet              many episodes per file, the declared non-video features plus
                                                 timestamp, frame_index, episode_index, index, task_index;
                                                 a column missing from `features` makes lerobot refuse the file
    videos/<camera>/chunk-XXX/file-XXX.mp4       episodes concatenated, located by from/to timestamps

A file is closed and the next one started (file index + 1; chunk index + 1 after `chunks_size` files) when
adding the next episode would reach the file-size limit.

v2.0 / v2.1 (one parquet and one mp4 per camera per episode) are described in `lerobot_v2`.
"""

from __future__ import annotations

CODEBASE_VERSION = "v3.0"
LEROBOT_VERSION = "0.6.1"

DEFAULT_CHUNK_SIZE = 1000
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"

# The per-frame columns every dataset has, after the declared features, in this order.
FRAME_FEATURES: dict[str, dict[str, object]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
QUANTILE_KEYS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)
STAT_KEYS = ("min", "max", "mean", "std", "count", *QUANTILE_KEYS)

VIDEO_NAMES = ["height", "width", "channels"]


def next_chunk_file(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) indices after (chunk_index, file_index): a chunk holds `chunks_size` files."""
    if file_index == chunks_size - 1:
        return chunk_index + 1, 0
    return chunk_index, file_index + 1


def episode_columns(video_keys: list[str]) -> list[str]:
    """The location columns of an episodes row, in lerobot's order (the stats/ and meta/ columns follow)."""
    columns = ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
               "dataset_to_index"]
    for key in video_keys:
        columns += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp",
                    f"videos/{key}/to_timestamp"]
    return columns

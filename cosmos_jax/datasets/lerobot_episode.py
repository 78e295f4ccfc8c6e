"""What a LeRobot reader hands out per episode, whatever the layout version, and the error for a bad one."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class BadEpisode(ValueError):
    """An episode that cannot be read; the message names its index (and the file at fault)."""

    def __init__(self, episode: int, reason: str) -> None:
        super().__init__(f"bad episode {episode}: {reason}")
        self.episode = episode
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Episode:
    """An episode's index, frame count and task texts, from the dataset's episode metadata."""

    index: int
    length: int
    tasks: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class EpisodeTable:
    """The parquet columns used here: actions [N, A] float32 (None when not read), task_index [N] (or None)."""

    actions: np.ndarray | None
    task_index: np.ndarray | None
    rows: int


def pyarrow_parquet() -> Any:
    """pyarrow.parquet, or an ImportError saying which extra installs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading LeRobot parquet files needs pyarrow: pip install 'cosmos-jax[lerobot]'") from None
    return pq


def column_array(table: Any, key: str, width: int, episode: int, path: Any) -> np.ndarray:
    """A [N, width] float32 array from a parquet column of numbers or of equal-length lists; BadEpisode naming
    the file for rows of the wrong width or non-finite values."""
    try:
        values = np.asarray(table.column(key).to_pylist(), np.float32)
    except (TypeError, ValueError):
        raise BadEpisode(episode, f"{path}: {key!r} rows are not equal-length numbers") from None
    if values.ndim == 1 and width == 1:
        values = values[:, None]
    if values.shape != (table.num_rows, width):
        raise BadEpisode(episode, f"{path}: {key!r} has shape {list(values.shape)}, expected "
                                  f"[{table.num_rows}, {width}] (wrong action width)")
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        raise BadEpisode(episode, f"{path}: {key!r} is not finite in frame(s) {bad[:8].tolist()}")
    return values

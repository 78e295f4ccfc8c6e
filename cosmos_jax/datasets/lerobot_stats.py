"""Per-feature statistics in LeRobot's form: min, max, mean, std, count and the q01 ... q99 quantiles.

Shapes follow lerobot 0.6.1 (`compute_stats.py`): a [N] column gives [1]-shaped stats, an [N, A] column [A],
a camera [3, 1, 1] (per RGB channel, pixel values / 255), and `count` is always [1] (the number of frames).
Numeric stats are numpy's own, computed exactly over the rows (lerobot estimates quantiles from a histogram;
ours are `np.quantile` with linear interpolation, and a dataset's numeric stats are computed over all its rows
rather than merged from the episodes'). Camera stats are computed on frames sampled as lerobot samples them
(100 evenly spaced frames per episode at most, larger frames strided down to about 150 pixels) and merged
across episodes as lerobot merges them (count-weighted means, pooled variance, count-weighted quantiles).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cosmos_jax.datasets.lerobot_layout import QUANTILE_KEYS, QUANTILES

Stats = dict[str, np.ndarray]


def feature_stats(values: np.ndarray) -> Stats:
    """Stats of a numeric column [N] or [N, A] (N >= 1); float64 results, count [1] int64."""
    values = np.asarray(values)
    rows = values.reshape(values.shape[0], -1).astype(np.float64)
    stats = {"min": rows.min(0), "max": rows.max(0), "mean": rows.mean(0), "std": rows.std(0),
             "count": np.array([values.shape[0]], np.int64)}
    for key, q in zip(QUANTILE_KEYS, np.quantile(rows, QUANTILES, axis=0)):
        stats[key] = q
    return stats


def sample_frame_indices(length: int) -> np.ndarray:
    """Frames used for camera stats: all of a short episode, else evenly spaced ones (100 below ~500 frames,
    length^0.75 up to 10 000)."""
    count = max(min(100, length), min(int(length**0.75), 10_000))
    return np.round(np.linspace(0, length - 1, count)).astype(np.int64)


def image_stats(frames: np.ndarray) -> Stats:
    """Per-channel stats [3, 1, 1] in [0, 1] of camera frames [N, H, W, 3] uint8 (sampled, strided)."""
    frames = np.asarray(frames)[sample_frame_indices(frames.shape[0])]
    height, width = frames.shape[1:3]
    if max(height, width) >= 300:
        step = int(max(height, width) / 150)
        frames = frames[:, ::step, ::step]
    stats = feature_stats(frames.reshape(-1, 3))
    stats = {k: v if k == "count" else (v / 255.0).reshape(3, 1, 1) for k, v in stats.items()}
    stats["count"] = np.array([frames.shape[0]], np.int64)
    return stats


def merge_stats(parts: Sequence[Stats]) -> Stats:
    """Stats of the union of several parts, as lerobot merges episode stats: exact min, max, mean and std;
    quantiles averaged with the counts as weights."""
    counts = np.array([float(p["count"][0]) for p in parts])
    total = counts.sum()

    def weigh(values: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack(values)
        return (stacked * counts.reshape(-1, *[1] * (stacked.ndim - 1))).sum(0) / total

    mean = weigh([p["mean"] for p in parts])
    variance = weigh([p["std"] ** 2 + (p["mean"] - mean) ** 2 for p in parts])
    merged = {"min": np.min([p["min"] for p in parts], 0), "max": np.max([p["max"] for p in parts], 0),
              "mean": mean, "std": np.sqrt(variance), "count": np.array([int(total)], np.int64)}
    for key in QUANTILE_KEYS:
        merged[key] = weigh([p[key] for p in parts])
    return merged


def stats_to_json(stats: Mapping[str, Stats]) -> dict[str, dict[str, list]]:
    """{feature: {stat: nested lists}} (what meta/stats.json holds)."""
    return {key: {name: np.asarray(value).tolist() for name, value in values.items()}
            for key, values in stats.items()}


def stats_from_json(raw: Mapping[str, Mapping[str, object]], source: str) -> dict[str, Stats]:
    """{feature: {stat: array}}; ValueError naming `source` and the feature for a value that is not numeric."""
    stats = {}
    for key, values in raw.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: stats of {key!r} must be an object of arrays")
        try:
            stats[key] = {name: np.atleast_1d(np.asarray(value, np.float64)) for name, value in values.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{source}: stats of {key!r} are not numeric arrays") from None
    return stats

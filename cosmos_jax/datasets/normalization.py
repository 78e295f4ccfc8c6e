"""Action normalisation between an embodiment's raw units and the model's space, and its stats file.

    quantile   model = (raw − (q99 + q01)/2) / ((q99 − q01)/2): the 1 % .. 99 % range maps to [−1, 1]
    mean_std   model = (raw − mean) / std

A channel whose range (or std) is below 1e-8 is divided by 1e-8 instead, so constant channels map to 0 and
back. The stats file (`action_stats.json`) names the domain, the feature, the kind, the mode, the channel
names and the per-channel stats in LeRobot's form (min, max, mean, std, count, q01 ... q99); it is written
beside prepared training data and copied with a fine-tuned checkpoint, so that generated actions can be
written in raw units. Loading checks it against the embodiment registry: an unknown domain, a width that is
not the domain's, a missing stat, or a value that is not finite is a ValueError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_jax.datasets.embodiments import ACTION_KINDS, embodiment
from cosmos_jax.datasets.lerobot_stats import Stats
from cosmos_jax.datasets.lerobot_writer import vector_feature

STATS_FILE = "action_stats.json"
STATS_FORMAT = "cosmos-jax action stats"
MODES = {"quantile": ("q01", "q99"), "mean_std": ("mean", "std")}
_FLOOR = 1e-8


@dataclasses.dataclass(frozen=True)
class ActionNormalizer:
    """Per-channel affine map raw <-> model for one domain: model = (raw − offset) / scale, arrays [A]."""

    domain: str
    mode: str
    kind: str
    feature: str
    stats: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        check_stats(self.domain, self.mode, self.kind, self.stats, source="action stats")

    @property
    def width(self) -> int:
        return int(np.asarray(self.stats["mean"]).shape[0])

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "quantile":
            low, high = (np.asarray(self.stats[k], np.float64) for k in ("q01", "q99"))
            offset, scale = (high + low) / 2, (high - low) / 2
        else:
            offset, scale = np.asarray(self.stats["mean"], np.float64), np.asarray(self.stats["std"], np.float64)
        return offset, np.maximum(scale, _FLOOR)

    def _check(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.ndim < 1 or actions.shape[-1] != self.width:
            raise ValueError(f"actions of width {actions.shape[-1] if actions.ndim else 0} do not fit the "
                             f"{self.domain!r} stats (width {self.width})")
        return actions

    def to_model(self, raw: np.ndarray) -> np.ndarray:
        """[..., A] raw units -> model space, float64."""
        offset, scale = self._affine()
        return (self._check(raw).astype(np.float64) - offset) / scale

    def to_raw(self, model: np.ndarray) -> np.ndarray:
        """[..., A] model space -> raw units, float64."""
        offset, scale = self._affine()
        return self._check(model).astype(np.float64) * scale + offset

    def to_json(self) -> dict[str, Any]:
        entry = embodiment(self.domain)
        return {"format": STATS_FORMAT, "domain": self.domain, "domain_id": entry.domain_id, "kind": self.kind,
                "feature": self.feature, "mode": self.mode, "names": list(entry.channels or ()),
                "stats": {k: np.asarray(v).tolist() for k, v in self.stats.items()}}


def check_stats(domain: str, mode: str, kind: str, stats: Mapping[str, Any], source: str) -> None:
    """ValueError naming `source` unless the stats fit the domain: known domain with a fixed width, known mode
    and kind, the mode's stats present, every stat a finite [A] array with A the domain's width."""
    entry = embodiment(domain)
    if entry.raw_action_dim is None:
        raise ValueError(f"{source}: domain {domain!r} has no fixed action width, so it cannot be normalised")
    if mode not in MODES:
        raise ValueError(f"{source}: mode {mode!r} is not one of {sorted(MODES)}")
    if kind not in ACTION_KINDS:
        raise ValueError(f"{source}: kind {kind!r} is not one of {list(ACTION_KINDS)}")
    missing = [k for k in MODES[mode] if k not in stats]
    if missing:
        raise ValueError(f"{source}: {mode} normalisation needs stats {missing}; has {sorted(stats)}")
    for key, value in stats.items():
        if key == "count":
            continue
        array = np.asarray(value, np.float64)
        if array.shape != (entry.raw_action_dim,):
            raise ValueError(f"{source}: stat {key!r} has shape {list(array.shape)}, domain {domain!r} has "
                             f"{entry.raw_action_dim} action channels")
        if not np.isfinite(array).all():
            raise ValueError(f"{source}: stat {key!r} is not finite in channel(s) "
                             f"{np.flatnonzero(~np.isfinite(array)).tolist()}")


def normalizer_from_stats(domain: str, stats: Mapping[str, np.ndarray] | Stats, *, mode: str = "quantile",
                          kind: str | None = None, feature: str = "action") -> ActionNormalizer:
    """An ActionNormalizer from LeRobot-form stats of one action feature (kind: the registry's by default)."""
    resolved = kind or embodiment(domain).kind or ""
    return ActionNormalizer(domain, mode, resolved, feature, {k: np.asarray(v, np.float64) for k, v in stats.items()})


def write_normalizer(path: str | os.PathLike[str], normalizer: ActionNormalizer) -> None:
    """Write the stats file (temporary name, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(normalizer.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def action_feature(domain: str, normalizer: ActionNormalizer | None) -> dict[str, Any]:
    """The LeRobot feature for generated actions of `domain`: [A] float32 named by the registry, its `info`
    saying the space the rows are in ("raw" when written through `normalizer`, else "model"), the kind and
    the domain."""
    entry = embodiment(domain)
    if entry.channels is None:
        raise ValueError(f"domain {domain!r} has no fixed action width, so its actions cannot be stored")
    if normalizer is not None:
        check_stats(domain, normalizer.mode, normalizer.kind, normalizer.stats, source=f"{domain} action stats")
    info = {"space": "model" if normalizer is None else "raw", "kind": entry.kind if normalizer is None
            else normalizer.kind, "embodiment": domain, "domain_id": entry.domain_id}
    return vector_feature(entry.channels, info=info)


def dataset_actions(model_actions: np.ndarray, normalizer: ActionNormalizer | None) -> np.ndarray:
    """[N, A] float32 rows to store: raw units through `normalizer`, else the model-space values unchanged."""
    actions = np.asarray(model_actions)
    return (actions if normalizer is None else normalizer.to_raw(actions)).astype(np.float32)


def copy_stats_file(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str]) -> Path | None:
    """Check and copy `src_dir`'s stats file into `dst_dir` (a training run beside its checkpoints); the
    destination path, or None when `src_dir` has none."""
    src = Path(src_dir) / STATS_FILE
    if not src.is_file():
        return None
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    write_normalizer(Path(dst_dir) / STATS_FILE, read_normalizer(src))
    return Path(dst_dir) / STATS_FILE


def normalizer_for_domain(path: str | os.PathLike[str], domain: str) -> ActionNormalizer:
    """The stats file at `path`, checked to fit `domain` (same projection weights and width)."""
    normalizer = read_normalizer(path)
    wanted = embodiment(domain)
    if (embodiment(normalizer.domain).domain_id, normalizer.width) != (wanted.domain_id, wanted.raw_action_dim):
        raise ValueError(f"{path}: stats of domain {normalizer.domain!r} ({normalizer.width} channels) do not fit "
                         f"domain {domain!r} ({wanted.raw_action_dim} channels)")
    return normalizer


def read_normalizer(path: str | os.PathLike[str]) -> ActionNormalizer:
    """Read and check a stats file; ValueError naming the file for any problem."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: no action stats (generated actions stay in model space)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != STATS_FORMAT:
        raise ValueError(f"{path}: not a {STATS_FORMAT!r} file")
    missing = [k for k in ("domain", "mode", "kind", "feature", "stats") if k not in raw]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    if not isinstance(raw["stats"], dict):
        raise ValueError(f"{path}: stats must be an object of per-channel arrays")
    try:
        stats = {k: np.asarray(v, np.float64) for k, v in raw["stats"].items()}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: stats must be arrays of numbers") from None
    try:
        return ActionNormalizer(str(raw["domain"]), str(raw["mode"]), str(raw["kind"]), str(raw["feature"]), stats)
    except ValueError as e:
        raise ValueError(f"{path}: {e}".replace(": action stats:", ":")) from None

"""Open a LeRobot dataset folder of any supported layout: v3.0 (`lerobot_v3`) or v2.0 / v2.1 (`lerobot_v2`).

Both readers give the same surface: `fps`, `features`, `video_keys`, `feature_width(key)`, `episodes`
(index, length, tasks), `tasks` {task_index: text}, `problems` [(episode, reason)] found in the episode
metadata, `read_table(episode, action_key)` and `read_frames(episode, video_key, rows)`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cosmos_jax.datasets.lerobot_v2 import LeRobotV2, read_json
from cosmos_jax.datasets.lerobot_v3 import LeRobotV3


def open_lerobot(root: str | os.PathLike[str]) -> LeRobotV2 | LeRobotV3:
    """The reader for the folder's meta/info.json codebase_version; ValueError naming the file otherwise."""
    path = Path(root) / "meta" / "info.json"
    version = str(read_json(path).get("codebase_version", ""))
    if version.startswith("v2"):
        return LeRobotV2(root)
    if version.startswith("v3"):
        return LeRobotV3(root)
    raise ValueError(f"{path}: codebase_version {version!r} is not supported (LeRobot v2.x and v3.0 layouts)")

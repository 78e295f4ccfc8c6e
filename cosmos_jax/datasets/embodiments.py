"""The embodiment registry: every action domain Cosmos 3 knows, with its id, channels and action kind.

A domain's `domain_id` selects the transformer's domain-aware action projection weights; several names
share an id where the released model shares weights. `channels` names each raw action channel (for plots
and for a LeRobot dataset's feature `names`); its length is the domain's raw action width, the width the
released pipeline pads to the model's 64 channels (`no_action` and `libero` have no fixed width and cannot
be used for action inference). `kind` says how a row relates to the trajectory:

    absolute  the pose or position reached at that frame
    target    the commanded pose or position for the next frame (PushT's target point)
    delta     the change from this frame to the next (a relative pose)

Resampling a trajectory in time takes the row at each kept frame for absolute and target actions and sums
the rows over the skipped frames for delta ones.

The reference gives only each domain's width; the block layout here is read from those widths (9-D poses:
x, y, z and a 6-D rotation, 1-D grippers, 15-D blocks of five fingertip positions). `galbot` (30) and the
agibot domains (29) do not split into such blocks unambiguously and keep numbered channels; the kinds are
defaults that a dataset can override (`prepare lerobot --action-kind`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

ACTION_KINDS = ("absolute", "target", "delta")


def _pose(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{name}" for name in ("x", "y", "z", "rot6d_0", "rot6d_1", "rot6d_2", "rot6d_3",
                                                 "rot6d_4", "rot6d_5"))


def _fingertips(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{finger}_{axis}" for finger in ("thumb", "index", "middle", "ring", "pinky")
                 for axis in "xyz")


_ARM = (*_pose("eef_"), "gripper")
_DUAL_ARM = (*_pose("left_eef_"), "left_gripper", *_pose("right_eef_"), "right_gripper")
_HANDS = (*_pose("camera_"), *_pose("left_wrist_"), *_pose("right_wrist_"), *_fingertips("left_"),
          *_fingertips("right_"))


@dataclasses.dataclass(frozen=True)
class Embodiment:
    """One action domain: name, projection-weight id, channel names (None: no fixed width), action kind."""

    name: str
    domain_id: int
    channels: tuple[str, ...] | None
    kind: str | None

    @property
    def raw_action_dim(self) -> int | None:
        return None if self.channels is None else len(self.channels)


def _numbered(width: int) -> tuple[str, ...]:
    return tuple(f"a{i:02d}" for i in range(width))


_TABLE = (
    Embodiment("no_action", 0, None, None),
    Embodiment("av", 1, _pose("ego_"), "delta"),
    Embodiment("camera_pose", 2, _pose("camera_"), "delta"),
    Embodiment("hand_pose", 3, _HANDS, "absolute"),
    Embodiment("pusht", 4, ("x", "y"), "target"),
    Embodiment("libero", 5, None, None),
    Embodiment("umi", 6, _ARM, "delta"),
    Embodiment("bridge_orig_lerobot", 7, _ARM, "delta"),
    Embodiment("droid_lerobot", 8, _ARM, "delta"),
    Embodiment("robomind-franka", 8, _ARM, "delta"),
    Embodiment("galbot", 9, _numbered(30), "absolute"),
    Embodiment("robomind-franka-dual", 12, _DUAL_ARM, "delta"),
    Embodiment("robomind-ur", 13, _ARM, "delta"),
    Embodiment("agibotworld", 15, _numbered(29), "absolute"),
    Embodiment("agibot_gear_gripper", 15, _numbered(29), "absolute"),
    Embodiment("agibot_gear_gripper_ext", 15, _numbered(29), "absolute"),
    Embodiment("fractal", 20, _ARM, "delta"),
)

EMBODIMENTS: Mapping[str, Embodiment] = {e.name: e for e in _TABLE}


def embodiment(name: str) -> Embodiment:
    """The registry entry of `name`; ValueError listing the known names otherwise."""
    if name not in EMBODIMENTS:
        raise ValueError(f"unknown embodiment domain {name!r}; expected one of {sorted(EMBODIMENTS)}")
    return EMBODIMENTS[name]


def width_of_domain_id(domain_id: int) -> int | None:
    """The raw action width shared by every domain with this id (None: no fixed width, or an unknown id)."""
    widths = {e.raw_action_dim for e in _TABLE if e.domain_id == domain_id}
    return widths.pop() if len(widths) == 1 else None


def names_of_domain_id(domain_id: int) -> list[str]:
    return [e.name for e in _TABLE if e.domain_id == domain_id]

"""Reading and writing one leaf of a nested parameter dict by its path of keys (shared by the key maps)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """tree[path[0]][path[1]]...; a missing key raises KeyError."""
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set tree[path[0]]...[path[-1]] = value, creating intermediate dicts."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value

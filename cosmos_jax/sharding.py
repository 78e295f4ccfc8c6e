"""Mesh, logical axis names and the rules that map them to mesh axes.

Every parameter and activation dimension has a *logical* name ("embed", "q_heads", "mlp", "batch", "gen_seq",
...). A rules table (one per preset, configs/mesh/<preset>.json) maps each logical name to zero or more *mesh*
axes among `data`, `fsdp`, `context`, `tensor`. A partition spec is the rules applied to the names, dropping any
mesh axis that does not divide its dimension (so a small parameter stays replicated rather than failing) and any
mesh axis already used by an earlier dimension of the same array.

A parameter's logical names are declared once, in its row of the transformer key table
(`cosmos_jax.convert.keymap_transformer`, which also holds its checkpoint key and layout transform); this module
only looks them up by the parameter's path. So the sharding of one weight is that row plus the preset's rules
table, nothing else (docs/checkpoints.md walks one weight through). A quantized kernel (`qwix.QArray`,
cosmos_jax.convert.quantize) takes its names from the same row: its values (.../kernel/qvalue) the kernel's, its
per-channel scales (.../kernel/scale) the kernel's with the reduced axis, of size 1, named None (unsharded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from cosmos_jax.config import PRESETS_DIR
from cosmos_jax.convert.keymap_transformer import LogicalAxes, entry_for_path
from cosmos_jax.convert.quantize import QVALUE, SCALE, channel_axes, is_quantized_path

MESH_AXES = ("data", "fsdp", "context", "tensor")
MESH_PRESETS_DIR = os.path.join(PRESETS_DIR, "mesh")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

# Logical names of activations (used by Cosmos3Transformer's constraints and the context-parallel attention).
BATCH, SEQ, GEN_SEQ, ACT_EMBED, HEADS, KV_HEADS = "batch", "seq", "gen_seq", "act_embed", "heads", "kv_heads"


class MeshSpecError(ValueError):
    """A mesh spec string is malformed or does not match the available devices."""


# ------------------------------------------------------------------------------------------------ mesh


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'fsdp=8,tensor=4' -> {'data': 1, 'fsdp': 8, 'context': 1, 'tensor': 4} (every mesh axis, in mesh order)."""
    if not isinstance(spec, str) or not spec.strip():
        raise MeshSpecError(f"a mesh spec is a string like 'fsdp=8,tensor=4', got {spec!r}")
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep:
            raise MeshSpecError(f"mesh spec {spec!r}: {part.strip()!r} is not of the form axis=size")
        if name not in MESH_AXES:
            raise MeshSpecError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if name in seen:
            raise MeshSpecError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value.strip())
        except ValueError:
            raise MeshSpecError(
                f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {value!r}"
            ) from None
        if size <= 0:
            raise MeshSpecError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {size}")
        seen.add(name)
        sizes[name] = size
    return sizes


def mesh_size(spec: str) -> int:
    """The number of devices a mesh spec needs."""
    return math.prod(parse_mesh_spec(spec).values())


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, context, tensor), all Auto, from a spec like 'fsdp=8,tensor=4'.

    Axes not named have size 1. The spec must use exactly the given devices (default: all of jax.devices()).
    `tensor` is the innermost (fastest-varying) axis, so it lands on the closest devices.
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(sizes.values())
    if needed != len(devices):
        raise MeshSpecError(
            f"mesh spec {spec!r} needs {needed} devices but {len(devices)} are available; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} before importing jax"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(spec: str) -> AbstractMesh:
    """A device-free mesh of the spec's shape: enough to compute partition specs for any device count."""
    sizes = parse_mesh_spec(spec)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------------------------- rules


def rules_from_mapping(raw: Mapping[str, Any]) -> Rules:
    """{'embed': 'fsdp', 'batch': ['data', 'fsdp'], 'norm': null} -> the hashable rules table."""
    rules = []
    for logical, target in raw.items():
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rule {logical!r} -> {list(axes)}: unknown mesh axes {bad}; axes are {list(MESH_AXES)}")
        rules.append((str(logical), axes))
    return tuple(rules)


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A named sharding preset: its rules table and the reference mesh it is planned and snapshotted on."""

    name: str
    mesh: str
    rules: Rules


def load_mesh_preset(name_or_path: str | os.PathLike) -> MeshPreset:
    """configs/mesh/<name>.json (or a path): {"mesh": "fsdp=8,tensor=4", "rules": {logical: mesh axes}}."""
    path = os.fspath(name_or_path)
    if not os.path.isfile(path):
        path = os.path.join(MESH_PRESETS_DIR, f"{os.path.basename(path).removesuffix('.json')}.json")
    if not os.path.isfile(path):
        available = sorted(f.removesuffix(".json") for f in os.listdir(MESH_PRESETS_DIR) if f.endswith(".json"))
        raise ValueError(f"unknown mesh preset {name_or_path!r}; presets: {', '.join(available)}")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    missing = {"mesh", "rules"} - set(raw)
    if missing:
        raise ValueError(f"{path}: mesh preset lacks {sorted(missing)}")
    parse_mesh_spec(raw["mesh"])
    return MeshPreset(os.path.basename(path).removesuffix(".json"), raw["mesh"], rules_from_mapping(raw["rules"]))


def spec_for(shape: Sequence[int], names: LogicalAxes, rules: Rules, mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """The partition spec of an array of `shape` whose dimensions have logical `names`.

    Each dimension takes the mesh axes its name maps to, in order, keeping an axis only if it is still unused
    in this spec and the product of the kept axes' sizes divides the dimension. Every name must have a rule
    (possibly mapping to no axis), so a missing rule is an error rather than a silently replicated array.
    """
    if len(shape) != len(names):
        raise ValueError(f"logical axes {names} do not match an array of rank {len(shape)} (shape {tuple(shape)})")
    table = dict(rules)
    missing = [n for n in names if n is not None and n not in table]
    if missing:
        raise ValueError(f"no sharding rule for logical axes {missing} (rules cover {sorted(table)})")
    used: set[str] = set()
    out: list[Any] = []
    for dim, name in zip(shape, names):
        kept: list[str] = []
        for axis in table.get(name, ()) if name is not None else ():
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in kept) * size):
                continue
            kept.append(axis)
            used.add(axis)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


# ---------------------------------------------------------------------------------------- parameter names

def param_logical_axes(path: Sequence[str], ndim: int) -> LogicalAxes:
    """Logical names of one parameter, read from its row of the transformer key table (`entry_for_path`), e.g.
    ('generator', 'layers', 'q_proj', 'kernel') -> ('layers', 'embed', 'q_heads'). The leaves of a quantized
    kernel take the kernel's row: .../kernel/qvalue its names, .../kernel/scale its names with the reduced axis
    None, e.g. ('layers', None, 'q_heads')."""
    path = tuple(path)
    part = path[-1] if path and path[-1] in (QVALUE, SCALE) and is_quantized_path(path[:-1]) else None
    entry = entry_for_path(path[:-1] if part else path)
    names = entry.logical_axes() if entry is not None else ()
    if part == SCALE and len(names) == ndim:
        kept = channel_axes(ndim, entry.per_layer)
        names = tuple(name if axis in kept else None for axis, name in enumerate(names))
    if not names or len(names) != ndim:
        raise ValueError(f"no logical axes known for parameter {'/'.join(path)} of rank {ndim}")
    return names


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def param_specs(abstract_params: Any, mesh: Mesh | AbstractMesh, rules: Rules) -> Any:
    """The tree of PartitionSpecs for a parameter tree under `rules` on `mesh`."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: spec_for(x.shape, param_logical_axes(_path_names(p), len(x.shape)), rules, mesh), abstract_params
    )


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """The tree of NamedShardings for a parameter tree under `rules` on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(abstract_params, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def specs_snapshot(abstract_params: Any, mesh: Mesh | AbstractMesh, rules: Rules) -> dict[str, list[Any]]:
    """{'generator/layers/q_proj/kernel': [None, 'fsdp', 'tensor'], ...}: a JSON-able view of param_specs."""
    flat = jax.tree_util.tree_flatten_with_path(param_specs(abstract_params, mesh, rules),
                                                is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    snapshot = {}
    for path, spec in flat:
        entries = list(spec) + [None] * (len(_leaf_at(abstract_params, path).shape) - len(spec))
        snapshot["/".join(_path_names(path))] = [list(e) if isinstance(e, tuple) else e for e in entries]
    return dict(sorted(snapshot.items()))


def _leaf_at(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in _path_names(path):
        tree = tree[p]
    return tree


def replicated_fraction(abstract_params: Any, mesh: Mesh | AbstractMesh, rules: Rules) -> float:
    """Share of parameter bytes that are fully replicated (no dimension sharded) under `rules` on `mesh`."""
    leaves = jax.tree.leaves(abstract_params)
    specs = jax.tree.leaves(param_specs(abstract_params, mesh, rules), is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = sum(_nbytes(x) for x in leaves)
    replicated = sum(_nbytes(x) for x, s in zip(leaves, specs) if all(e is None for e in s))
    return replicated / total if total else 0.0


def _nbytes(x: Any) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


# ------------------------------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Activation constraints by logical name on a mesh (hashable: a field of Cosmos3Transformer).

    With a `context` axis of size > 1 the generator attention runs context-parallel
    (`cosmos_jax.modeling.context_parallel.sharded_generator_attention`); with `query_chunk`, each device runs its generator queries in
    rematerialised chunks of at most that many tokens (flash-like memory for any attention implementation).
    """

    mesh: Mesh
    rules: Rules
    query_chunk: int | None = None

    def spec(self, shape: Sequence[int], names: LogicalAxes) -> PartitionSpec:
        return spec_for(shape, names, self.rules, self.mesh)

    def constrain(self, x: jax.Array, names: LogicalAxes) -> jax.Array:
        """x with a sharding constraint from its logical axis names."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(x.shape, names)))


def shard_batch(batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """Place every array of an input pytree (TextInputs, GeneratorInputs, ...) with its leading axis sharded
    as the logical 'batch' axis (where it divides) and the rest replicated."""

    def place(x: Any) -> Any:
        if x is None:
            return None
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        names = ((BATCH,) + (None,) * (x.ndim - 1)) if x.ndim else ()
        return jax.device_put(x, NamedSharding(mesh, spec_for(x.shape, names, rules, mesh)))

    return jax.tree.map(place, batch)

"""Host offload of the transformer's towers between uses (`--offload-reasoner`).

Both trees rest in host memory (`pinned_host`) between calls. A call moves the reasoner tower to the device,
computes the prompt's K/V cache, drops it, then moves the generator tower in for the denoising loop: the device
peak is the larger of (reasoner + its pass) and (generator + cache + the loop) instead of both towers together.
The generator's `und_k_norm` (Edge), which the reasoner pass reads, travels with the reasoner pass. On a mesh
every shard moves between its own device and that device's host memory (the sharding is kept, only the memory
kind changes), so the towers take turns per device.
"""

from __future__ import annotations

from typing import Any

import jax

HOST = "pinned_host"
DEVICE = "device"


def to_memory(tree: Any, kind: str) -> Any:
    """Every array of `tree` on its current devices in memory `kind` ("device" or "pinned_host")."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind)), tree)


def device_bytes(tree: Any) -> int:
    """Bytes of `tree` held in device memory (per the arrays' memory kinds)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if x.sharding.memory_kind == DEVICE)


def reasoner_pass_params(params: dict[str, Any]) -> dict[str, Any]:
    """On the device: what `encode_reasoner` reads (the reasoner tower and the generator's und_k_norm, if any)."""
    layers = {k: v for k, v in params["generator"]["layers"].items() if k == "und_k_norm"}
    return to_memory({"reasoner": params["reasoner"], "generator": {"layers": layers}}, DEVICE)


def generator_params(params: dict[str, Any]) -> dict[str, Any]:
    """On the device: what the denoising loop reads (the generator tower)."""
    return to_memory({"generator": params["generator"]}, DEVICE)

"""Training checkpoints with orbax: async saves, keep-N, exact resume, restore onto any mesh.

A checkpoint step holds two items: `state` (the whole TrainState: fp32 params, optimizer state, EMA, step, rng)
and `extra` (JSON: the grain iterator state and any run metadata). Arrays are saved with their global shapes,
so `restore` places them on whatever shardings the given abstract state carries (another mesh or device count).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cosmos_jax.training.step import TrainState


class TrainCheckpointer:
    """CheckpointManager over `directory` keeping the newest `keep` steps; saves run in the background."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                              item_names=("state", "extra"))

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, extra: dict[str, Any]) -> None:
        """Start saving `state` and `extra` at `step` (returns once the arrays are copied off the devices)."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         extra=ocp.args.JsonSave(extra)))

    def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The state at `step` (default: latest) placed on `abstract`'s shardings (ShapeDtypeStructs with a
        `sharding`), and the saved `extra`."""
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self._manager.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                       extra=ocp.args.JsonRestore()))
        return restored["state"], restored["extra"]

    def restore_extra(self, step: int | None = None) -> dict[str, Any]:
        """Only the saved `extra` at `step` (default: latest), e.g. to check a run's setup before its state."""
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self._manager.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (the restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

"""Warming the compile cache ahead of time: walk the real code path, compiling its programs instead of running them.

    with compile_only() as warming:      # every `call`/`execute` below compiles, and returns zeros
        ...the real code...
    warming.compiled                      # [Compiled(label, seconds, cached)] in compile order

    call(label, fn, *args, **kwargs)      # fn(*args, **kwargs); under compile_only, fn.lower(...).compile()
    lower_and_compile(lambda: ...)        # (compiled, seconds, cached) of an explicit lower().compile()
    execute(label, compiled, seconds, cached, *args)  # compiled(*args); under compile_only, nothing runs

`fn` is a `jax.jit` function and `compiled` a `jax.stages.Compiled`. Under `compile_only()` both return zeros
with the shapes, dtypes and shardings of the program's outputs, so the host code after them (and the small
eager ops it runs, which JAX also compiles and caches) goes on exactly as in a real run, on zeros. The programs
are lowered from the very arguments the real run would pass, so they are the programs (and persistent-cache
keys) the real run asks for. Each distinct program is compiled once per `compile_only()` block. Host code
that branched on the values (rather than the shapes) would follow the zeros; the sampling and sdg passes do
not (every shape there comes from the requests).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax import monitoring

_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One program compiled while warming: what it is, the seconds it took, and whether the persistent cache
    already had it (then the seconds are the load time)."""

    label: str
    seconds: float
    cached: bool

    def line(self) -> str:
        return f"compiled {self.label}: {self.seconds:.2f}s{' (already cached)' if self.cached else ''}"


@dataclasses.dataclass
class Warming:
    """The programs one `compile_only()` block compiled, and its executables by argument signature."""

    compiled: list[Compiled] = dataclasses.field(default_factory=list)
    executables: dict[Any, Any] = dataclasses.field(default_factory=dict)
    executed: set[int] = dataclasses.field(default_factory=set)
    on_compiled: Callable[[Compiled], None] | None = None

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.compiled)

    def summary(self) -> str:
        """`5 programs (3 new, 2 already cached), 41.2s compiling`."""
        new = sum(not c.cached for c in self.compiled)
        return (f"{len(self.compiled)} programs ({new} new, {len(self.compiled) - new} already cached), "
                f"{self.seconds:.1f}s compiling")

    def record(self, label: str, seconds: float, cached: bool) -> None:
        entry = Compiled(label, seconds, cached)
        self.compiled.append(entry)
        if self.on_compiled is not None:
            self.on_compiled(entry)


_ACTIVE: contextvars.ContextVar[Warming | None] = contextvars.ContextVar("cosmos_jax_warming", default=None)
_hits = [0]
_listening = [False]


def _count_hit(name: str, **_: Any) -> None:
    if name == _HIT_EVENT:
        _hits[0] += 1


def _listen() -> None:
    """Count persistent-cache hits from now on (JAX's listeners cannot be removed, so this happens once)."""
    if not _listening[0]:
        monitoring.register_event_listener(_count_hit)
        _listening[0] = True


def warming() -> Warming | None:
    """The active `compile_only()` block's record, or None when programs run."""
    return _ACTIVE.get()


@contextlib.contextmanager
def compile_only(on_compiled: Callable[[Compiled], None] | None = None) -> Iterator[Warming]:
    """Inside the block, `call` and `execute` compile and return zeros; `on_compiled` sees each new program."""
    _listen()
    record = Warming(on_compiled=on_compiled)
    token = _ACTIVE.set(record)
    try:
        yield record
    finally:
        _ACTIVE.reset(token)


def call(label: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`; under `compile_only()`, compile it for these arguments and return zeros like its
    outputs (`label` names the program in the record)."""
    record = _ACTIVE.get()
    if record is None:
        return fn(*args, **kwargs)
    key = (fn, _signature((args, kwargs)))
    compiled = record.executables.get(key)
    if compiled is None:
        hits, start = _hits[0], time.perf_counter()
        compiled = fn.lower(*args, **kwargs).compile()
        record.executables[key] = compiled
        record.record(label, time.perf_counter() - start, _hits[0] > hits)
    return zeros_like_outputs(compiled, _any_committed((args, kwargs)))


def lower_and_compile(lowered: Callable[[], Any]) -> tuple[Any, float, bool]:
    """(the executable `lowered()` compiles, its seconds, whether the persistent cache had it: known only inside
    a `compile_only()` block, False outside)."""
    hits, start = _hits[0], time.perf_counter()
    compiled = lowered()
    return compiled, time.perf_counter() - start, _hits[0] > hits


def execute(label: str, compiled: Any, seconds: float, cached: bool, *args: Any) -> Any:
    """`compiled(*args)`; under `compile_only()`, record its compile (`seconds`, `cached`: how it went, from
    `lower_and_compile`) the first time and return zeros like its outputs."""
    record = _ACTIVE.get()
    if record is None:
        return compiled(*args)
    if id(compiled) not in record.executed:
        record.executed.add(id(compiled))
        record.record(label, seconds, cached)
    return zeros_like_outputs(compiled, _any_committed(args))


def zeros_like_outputs(compiled: Any, committed: bool) -> Any:
    """Zeros with the shape, dtype and sharding of every output of a `jax.stages.Compiled`, committed to their
    devices as a jit's outputs are when `committed` (an argument was). It matters: eager ops on committed
    arrays lower with sharding annotations, so they are other programs (other cache keys) than on uncommitted."""
    return jax.tree.map(lambda info, sharding: _zeros(info, sharding, committed), compiled.out_info,
                        compiled.output_shardings)


def _zeros(info: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding, committed: bool) -> jax.Array:
    zeros = np.broadcast_to(np.zeros((), info.dtype), info.shape)
    if not committed:
        return jax.device_put(zeros)
    return jax.make_array_from_callback(info.shape, sharding, lambda index: zeros[index])


def _any_committed(tree: Any) -> bool:
    """Whether a jit called with these arguments commits its outputs (any argument is a committed array)."""
    return any(isinstance(x, jax.Array) and x.committed for x in jax.tree.leaves(tree))


def _signature(tree: Any) -> Any:
    """A hashable key of a call's arguments: the tree structure, each array's shape, dtype and sharding, and
    every other leaf as is (static arguments)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (x.shape, x.dtype, getattr(x, "sharding", None)) if isinstance(x, (jax.Array, np.ndarray)) else x
        for x in leaves)

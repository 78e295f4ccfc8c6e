"""Everything one server holds: the engine, batcher, job store, limits, metrics and the key; and the count of
requests being answered, so that a drain (SIGTERM) waits for the last reply to be sent."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading

from cosmos_jax.serve.batcher import Batcher
from cosmos_jax.serve.engine import Engine
from cosmos_jax.serve.fields import PolicyDefaults
from cosmos_jax.serve.jobs import JobStore
from cosmos_jax.serve.limits import Limits
from cosmos_jax.serve.metrics import Metrics


@dataclasses.dataclass(eq=False)
class ServeState:
    engine: Engine
    batcher: Batcher
    store: JobStore
    limits: Limits
    metrics: Metrics
    defaults: PolicyDefaults
    api_key: str | None = None
    writer: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cosmos-serve-writer"))
    _active: int = 0
    _cond: threading.Condition = dataclasses.field(default_factory=threading.Condition)

    def enter(self) -> None:
        """A request is being answered (from arrival to its reply sent or its job record final)."""
        with self._cond:
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish every accepted one and wait for its reply; True when idle."""
        if not self.batcher.drain(timeout):
            return False
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)

    def close(self) -> None:
        self.drain()
        self.batcher.stop()
        self.writer.shutdown(wait=True)


def create_state(
    engine: Engine, *, results: str, limits: Limits | None = None, max_batch: int = 4, max_wait_ms: float = 20.0,
    queue: int = 64, api_key: str | None = None,
) -> ServeState:
    """A server's state: the batcher started, the job store loaded from `results` (jobs a stopped server left
    queued or running are marked failed there)."""
    limits = limits or Limits()
    metrics = Metrics(max_batch)
    batcher = Batcher(engine, metrics, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0, capacity=queue)
    return ServeState(engine, batcher, JobStore(results), limits, metrics, engine.defaults, api_key)

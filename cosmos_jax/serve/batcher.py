"""Dynamic batching: concurrent same-shape requests gathered into one batched call.

The worker takes the oldest waiting request, then for up to `max_wait_s` gathers waiting requests of the same
`BatchShape` (up to `max_batch` in all) and runs them as one batch on the engine; requests of other shapes wait
for a later batch, in arrival order. The queue is bounded: past `capacity` waiting requests `submit` refuses
(429 with a Retry-After from the recent batch times). `drain` stops taking new requests and returns once every
accepted one has finished (SIGTERM).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from cosmos_jax.serve.engine import Engine, Prepared
from cosmos_jax.serve.errors import draining, queue_full
from cosmos_jax.serve.metrics import Metrics


@dataclasses.dataclass(eq=False)
class _Waiting:
    item: Prepared
    future: concurrent.futures.Future
    on_start: Callable[[bool, int], None] | None
    on_progress: Callable[[float], None] | None


class Batcher:
    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch: int, max_wait_s: float, capacity: int):
        if max_batch < 1 or capacity < 1 or max_wait_s < 0:
            raise ValueError("max_batch and capacity must be >= 1 and max_wait_s >= 0")
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_wait_s, self.capacity = max_batch, max_wait_s, capacity
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._running = 0
        self._accepting = True
        self._stopped = False
        self._cond = threading.Condition()
        self._batch_seconds = 1.0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._thread = threading.Thread(target=self._work, name="cosmos-serve-batcher", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, item: Prepared, on_start: Callable[[bool, int], None] | None = None,
               on_progress: Callable[[float], None] | None = None) -> concurrent.futures.Future:
        """Queue a prepared request; the future gets its GenerationResult. `on_start(compiling, batch_size)` is
        called when its batch starts, `on_progress(fraction)` at every step. Raises ServeError 503 while
        draining, 429 when the queue is full."""
        with self._cond:
            if not self._accepting:
                raise draining()
            if len(self._waiting) >= self.capacity:
                raise queue_full(self._retry_after())
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._waiting.append(_Waiting(item, future, on_start, on_progress))
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()
            return future

    def _retry_after(self) -> int:
        batches_ahead = math.ceil((len(self._waiting) + 1) / self.max_batch) + self._running
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests; wait until every accepted one has finished. True when idle."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._waiting and not self._running, timeout)

    def stop(self) -> None:
        """Drain, then end the worker thread."""
        self.drain()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    def _gather(self) -> list[_Waiting] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._waiting or self._stopped)
            if not self._waiting:
                return None
            batch = [self._waiting.popleft()]
            shape = batch[0].item.shape
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                match = next((w for w in self._waiting if w.item.shape == shape), None)
                if match is not None:
                    self._waiting.remove(match)
                    batch.append(match)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._accepting:
                    break
                self._cond.wait(remaining)
            self._running = len(batch)
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.in_flight.set(len(batch))
            return batch

    def _work(self) -> None:
        while (batch := self._gather()) is not None:
            self._run(batch)
            with self._cond:
                self._running = 0
                self.metrics.in_flight.set(0)
                self._cond.notify_all()

    def _run(self, batch: list[_Waiting]) -> None:
        items = [w.item for w in batch]
        compiling = not self.engine.is_compiled(items)
        live = [w.future.set_running_or_notify_cancel() for w in batch]  # False: cancelled while waiting
        for w, alive in zip(batch, live):
            if alive and w.on_start is not None:
                w.on_start(compiling, len(batch))
        self.metrics.compiling.set(int(compiling))
        self.metrics.batch_size.observe(len(batch))
        self.batch_sizes[len(batch)] += 1

        def progress(fraction: float) -> None:
            for w in batch:
                if w.on_progress is not None:
                    w.on_progress(fraction)

        start = time.perf_counter()
        try:
            results: list[Any] = self.engine.run(items, progress)
        except Exception as e:  # noqa: BLE001 - every failure goes to the requests of the batch
            for w, alive in zip(batch, live):
                if alive:
                    w.future.set_exception(e)
            return
        finally:
            self.metrics.compiling.set(0)
        seconds = time.perf_counter() - start
        self.metrics.batch_seconds.observe(seconds)
        if compiling:
            self.metrics.compiles.inc()
        else:
            self._batch_seconds = 0.5 * self._batch_seconds + 0.5 * seconds
        for w, alive, result in zip(batch, live, results):
            if alive:
                w.future.set_result(result)

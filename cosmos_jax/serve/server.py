"""Run the app under uvicorn on a host and port, with a graceful SIGTERM: the server stops taking requests
(503 / a WebSocket error frame), finishes every accepted one and sends its reply, then exits 0. A second
SIGTERM or SIGINT exits at once."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

from cosmos_jax.serve.app import build_app
from cosmos_jax.serve.state import ServeState

log = logging.getLogger("cosmos_jax.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the batcher before the server stops."""

    def __init__(self, config: uvicorn.Config, state: ServeState) -> None:
        super().__init__(config)
        self.state = state
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None:
            self.should_exit = self.force_exit = True
            return
        log.warning("signal %s: finishing %d queued and running requests, refusing new ones",
                    signal.Signals(sig).name, self.state.batcher.queue_depth)
        self._draining = threading.Thread(target=self._drain_then_exit, name="cosmos-serve-drain", daemon=True)
        self._draining.start()

    def _drain_then_exit(self) -> None:
        self.state.drain()
        self.should_exit = True


def uvicorn_config(state: ServeState, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(build_app(state), host=host, port=port, ws="websockets-sansio",
                          ws_max_size=state.limits.max_body_bytes, ws_ping_interval=20.0, ws_ping_timeout=60.0,
                          log_level="info", timeout_graceful_shutdown=30)


def serve(state: ServeState, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGTERM/SIGINT (see the module docstring), then close the state."""
    server = DrainingServer(uvicorn_config(state, host, port), state)
    try:
        server.run()
    finally:
        state.close()

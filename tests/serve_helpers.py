"""Helpers of the serve tests: openpi-client (installed with --no-deps when missing: it pins numpy < 2, which
this project does not use, while its code runs on numpy 2), a server on a free loopback port in a thread."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

OPENPI_CLIENT = "openpi-client==0.1.2"


def openpi_client():
    """The openpi_client.websocket_client_policy module, pip-installed without its numpy<2 pin if missing (one
    installer at a time across pytest-xdist workers)."""
    try:
        return importlib.import_module("openpi_client.websocket_client_policy")
    except ModuleNotFoundError:
        pass
    with open(os.path.join(tempfile.gettempdir(), "cosmos-jax-openpi-client.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        importlib.invalidate_caches()
        if importlib.util.find_spec("openpi_client") is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", OPENPI_CLIENT],
                           check=True)
            importlib.invalidate_caches()
    return importlib.import_module("openpi_client.websocket_client_policy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(state, port: int | None = None):
    """Serve `state` on 127.0.0.1:port in a background thread; yields the base URL."""
    import uvicorn

    from cosmos_jax.serve.server import uvicorn_config

    port = port or free_port()
    server = uvicorn.Server(uvicorn_config(state, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        state.close()

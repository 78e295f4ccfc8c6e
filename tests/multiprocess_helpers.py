"""Helpers of the jax.distributed tests: start N copies of a test file as worker processes (the file run as a
script is the worker: `python FILE WORKDIR PORT PROCESS_ID`), each with its own fake CPU devices and a coordinator
on a free loopback port, and wait for all of them, killing any that outlive the timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(script: str, workdir: Path, num_processes: int, local_devices: int) -> list[subprocess.Popen]:
    """`num_processes` workers running `script WORKDIR PORT I` with `local_devices` fake CPU devices each."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    port = free_port()
    return [
        subprocess.Popen([sys.executable, script, str(workdir), str(port), str(i)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(num_processes)
    ]


def wait_workers(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait for every worker; kill those still running after `timeout_s`; assert each exited 0 (showing its log)."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"

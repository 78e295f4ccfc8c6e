"""tools/device_check.py runs end to end in its --dry-run mode (tiny shapes, Pallas interpreted on CPU), so the
script the first GPU session runs cannot rot; without a GPU and without --dry-run it refuses with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "device_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    done = _run("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["dry_run"] is True
    measured = {(row["impl"], row["pass_"]) for row in report["kernel"] if row["ms"] is not None}
    assert {("pallas kernel", "fwd"), ("pallas kernel", "fwd+bwd")} <= measured
    assert all(row["tflops"] > 0 for row in report["kernel"] if row["ms"] is not None)
    stack = report["stack"]
    assert stack["step_ms"] > 0 and stack["generator_tokens"] > 0
    assert stack["extrapolated_720p_seconds"] == pytest.approx(stack["step_ms"] / 1e3 * 36 / stack["layers"] * 35)
    assert len(report["parity"]) == 7 and all(row["holds"] for row in report["parity"])
    memory = {row["weights"]: row for row in report["memory"]}
    assert sorted(memory) == ["bf16", "int8"]
    for row in memory.values():  # XLA:CPU keeps no device stats; the host figures are measured
        assert row["load_device_peak"] is None and row["step_device_peak"] is None
        assert row["load_host_peak"] > 0 and row["step_host_peak"] > 0 and row["predicted"] > row["held"] / 2
    assert memory["int8"]["held"] < 0.75 * memory["bf16"]["held"]  # the layer linears at one byte a weight
    table = (tmp_path / "device_check.md").read_text()
    assert "| dry run: 80 generator + 20 reasoner | pallas kernel | fwd+bwd |" in table
    assert "## Memory (synthetic transformer: 2 layers" in table and "| int8 |" in table


def test_without_a_gpu_it_refuses_instead_of_skipping(tmp_path):
    done = _run("--out", str(tmp_path))
    assert done.returncode == 2
    assert "no GPU found" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "device_check.json").exists()

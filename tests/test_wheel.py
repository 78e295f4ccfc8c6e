"""The built wheel works outside the checkout: its presets ship inside it and its console script runs.

The wheel is built from a copy of the source tree (the checkout stays clean) and installed into a fresh virtual
environment that reuses this interpreter's installed dependencies through a .pth file, so the test needs no
network and installs nothing but the wheel (`--no-deps`). Both commands run from a folder outside the checkout,
without PYTHONPATH, so only the installed package can be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cosmos_jax", "pallas_kernels", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh venv's bin folder, an environment without PYTHONPATH, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w",
          str(tmp / "dist")], src, env)
    (wheel,) = (tmp / "dist").glob("cosmos_jax-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env).strip()
    deps = [p for p in dict.fromkeys(site.getsitepackages() + [sysconfig.get_path("purelib")]) if os.path.isdir(p)]
    Path(purelib, "_host_dependencies.pth").write_text("\n".join(deps) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed",
          "--no-index", "-q", str(wheel)], tmp, env)
    work = tmp / "elsewhere"
    work.mkdir()
    return venv / "bin", env, work


@pytest.mark.slow
def test_installed_wheel_finds_its_presets_and_runs(installed):
    bin_dir, env, work = installed
    where = _run([str(bin_dir / "python"), "-c",
                  "import cosmos_jax.config as c; print(c.__file__); print(c.PRESETS_DIR)"], work, env).split()
    assert where[0].startswith(str(bin_dir.parent)) and where[1].startswith(str(bin_dir.parent)), where
    assert Path(where[1], "super.json").is_file() and Path(where[1], "mesh", "super.json").is_file()

    plan_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = _run([str(bin_dir / "cosmos-jax"), "plan", "--config", "super", "--mesh", "tensor=8"], work, plan_env)
    assert "plan: super" in out and "mesh=tensor=8 (8 devices)" in out

    _run([str(bin_dir / "cosmos-jax"), "demo", "--steps", "2", "--out", str(work / "demo"), "--no-progress"],
         work, env)
    report = json.loads((work / "demo" / "report.json").read_text())
    assert [run["mode"] for run in report["runs"]] == ["text2video", "policy"]
    assert report["runs"][0]["video_shape"] == [9, 64, 64, 3]

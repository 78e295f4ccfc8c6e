"""Peak host memory of loading the transformer quantized: from a folder stored quantized (`convert --quantize`)
against loading full precision and quantizing (`load(quantize=...)`), on tools/bench_convert.py's synthetic bf16
checkpoint (hidden 512, random finite bf16 values).

The Hub folder is converted three times (bf16 as stored, --quantize int8, --quantize fp8). Each load then runs
in a fresh child process that imports JAX and orbax, resets its peak-RSS counter (`/proc/self/clear_refs`),
loads the transformer in bf16 on the CPU (device memory is host memory there) and reports its peak RSS above the
RSS right before the load (`VmHWM - VmRSS`), the bytes the loaded tree holds, and the seconds it took.

    python tools/bench_quantized_load.py [--layers 16] [--intermediate 4096] [--workdir /tmp] [--json out.json]

Everything written is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bench_convert  # noqa: E402  (the synthetic checkpoint)

from cosmos_jax.convert.converter import convert  # noqa: E402

CHILD = r"""
import json, sys, time

import jax, jax.numpy as jnp, orbax.checkpoint.experimental.v1  # noqa: E401  (before the baseline)

from cosmos_jax.convert.load import load
from cosmos_jax.convert.quantize import tree_bytes


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


jax.devices()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
baseline = status_bytes("VmRSS")
start = time.perf_counter()
params = load(sys.argv[1], dtype=jnp.bfloat16, components=("transformer",), quantize=sys.argv[2] or None).params
jax.block_until_ready(params)
seconds = time.perf_counter() - start
print(json.dumps({"peak": status_bytes("VmHWM") - baseline, "held": tree_bytes(params), "seconds": seconds}))
"""

# (label, folder name, load's quantize)
CASES = (
    ("bf16, Hub folder", "hub", None),
    ("bf16, converted folder", "bf16", None),
    ("int8: Hub folder, quantized leaf by leaf", "hub", "int8"),
    ("int8: bf16 converted folder, load + quantize", "bf16", "int8"),
    ("int8: int8 converted folder", "int8", "int8"),
    ("fp8: Hub folder, quantized leaf by leaf", "hub", "fp8"),
    ("fp8: bf16 converted folder, load + quantize", "bf16", "fp8"),
    ("fp8: fp8 converted folder", "fp8", "fp8"),
)


def measure_load(folder: Path, quantize: str | None) -> dict[str, Any]:
    """{"peak": bytes above the pre-load RSS, "held": bytes of the loaded tree, "seconds"} of one load, run in a
    fresh child process."""
    child = subprocess.run([sys.executable, "-c", CHILD, str(folder), quantize or ""], capture_output=True,
                           text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"load of {folder} (quantize={quantize}) failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def write_folders(work: Path, layers: int, intermediate: int,
                  conversions: tuple[str, ...] = ("bf16", "int8", "fp8")) -> dict[str, Path]:
    """The synthetic Hub folder and its `conversions` (bf16 as stored, int8, fp8): {"hub", ...} -> folder."""
    config = bench_convert.synthetic_config(layers, intermediate)
    bench_convert.write_hub(work / "hub", config, max_shard_bytes=2**30)
    folders = {"hub": work / "hub"}
    for name in conversions:
        folders[name] = work / name
        convert(work / "hub", folders[name], dtype=None, quantize=None if name == "bf16" else name)
    return folders


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_quantized_load_", dir=args.workdir))
    try:
        folders = write_folders(work, args.layers, args.intermediate)
        rows = [{"case": label, "quantize": quantize, **measure_load(folders[name], quantize)}
                for label, name, quantize in CASES]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    full = rows[0]["held"]
    print(f"synthetic transformer: {args.layers} layers, hidden 512, intermediate {args.intermediate}; "
          f"bf16 tree {full / 2**20:,.0f} MiB")
    print("| load | tree held | peak RSS above baseline | peak / bf16 tree | seconds |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['case']} | {row['held'] / 2**20:,.0f} MiB | {row['peak'] / 2**20:,.0f} MiB | "
              f"{row['peak'] / full:.2f} | {row['seconds']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"layers": args.layers, "intermediate": args.intermediate, "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

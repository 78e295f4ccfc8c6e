"""Peak host memory of loading the transformer quantized: from a folder stored quantized (`convert --quantize`)
against loading full precision and quantizing (`load(quantize=...)`), on tools/bench_convert.py's synthetic bf16
checkpoint (hidden 512, random finite bf16 values).

The Hub folder is converted three times (bf16 as stored, --quantize int8, --quantize fp8). Each load then runs
in a fresh child process (tools/memory_probe.py) that imports JAX and orbax, resets its peak-RSS counter
(`/proc/self/clear_refs`), loads the transformer in bf16 on the CPU (device memory is host memory there) and
reports its peak RSS above the RSS right before the load (`VmHWM - VmRSS`), the bytes the loaded tree holds, and
the seconds it took.

    python tools/bench_quantized_load.py [--layers 16] [--intermediate 4096] [--step 8,30,52 [--text-tokens 300]]
                                         [--workdir /tmp] [--json out.json]

With --step T,H,W the children that load a folder as stored (bf16 converted, int8 converted, fp8 converted) then
compile and run one joint forward (bf16, batch 1, a video latent of T,H,W and --text-tokens prompt tokens), and
a second table gives XLA's predicted bytes for it beside the measured peak RSS of the step.

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

PROBE = Path(__file__).with_name("memory_probe.py")  # one load per fresh child process

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


def measure_load(folder: Path, quantize: str | None, step: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"peak": bytes above the pre-load RSS, "held": bytes of the loaded tree, "seconds", ...} of one load, run
    in a fresh child process; `step`: memory_probe's step arguments ("--step", "--latent", ...), if any."""
    argv = [sys.executable, str(PROBE), str(folder), *step] + ([] if quantize is None else ["--quantize", quantize])
    child = subprocess.run(argv, capture_output=True, text=True, check=False)
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
    parser.add_argument("--step", default=None, metavar="T,H,W",
                        help="also run one joint forward with a latent of T,H,W after the as-stored loads")
    parser.add_argument("--text-tokens", type=int, default=300, help="prompt tokens of that step (default 300)")
    args = parser.parse_args()
    step = () if args.step is None else ("--step", "--latent", args.step, "--text-tokens", str(args.text_tokens))
    work = Path(tempfile.mkdtemp(prefix="bench_quantized_load_", dir=args.workdir))
    try:
        folders = write_folders(work, args.layers, args.intermediate)
        rows = [{"case": label, "quantize": quantize,
                 **measure_load(folders[name], quantize, step if name == (quantize or "bf16") else ())}
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
    if step:
        print(f"\none joint forward after the load, bf16, batch 1, latent {args.step}, {args.text_tokens} text tokens")
        print("| folder as stored | tree held | XLA predicted: total (arguments, temporaries) | "
              "peak RSS of the step | peak RSS over load and step, above the pre-load baseline |")
        print("|---|---:|---:|---:|---:|")
        for row in (r for r in rows if "predicted" in r):
            predicted = row["predicted"]
            print(f"| {row['case']} | {row['held'] / 2**20:,.0f} MiB | {predicted['total'] / 2**20:,.0f} MiB "
                  f"({predicted['argument'] / 2**20:,.0f}, {predicted['temp'] / 2**20:,.0f}) | "
                  f"{row['step_peak'] / 2**20:,.0f} MiB | {max(row['peak'], row['step_total_peak']) / 2**20:,.0f} MiB |")
    if args.json is not None:
        args.json.write_text(json.dumps({"layers": args.layers, "intermediate": args.intermediate, "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

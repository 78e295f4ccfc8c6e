"""`cosmos-jax sdg` throughput: episodes/s against the batch size and the device count, and the cost of the
consistency passes as a fraction of generation, on the embedded demo checkpoint (random weights, fp32).

    python tools/bench_sdg.py --samples 8 --batch-sizes 1 2 4 --devices 2 4

One policy job (chunk 8, 4 steps, a 64×64 first frame) makes `--samples` episodes; each setting runs once to
compile (its shapes) and is then timed on a fresh dataset. Device counts above 1 run in a child process with
that many fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=D, `--mesh data=D`, batch D):
fake devices share the same CPU cores, so they measure the engine's overhead on a mesh, not a speed-up.
Times are the engine's own (report.json: generation plus consistency passes), not loading or merging.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _jobs(folder: Path, samples: int, steps: int) -> Path:
    from cosmos_jax.demo import demo_image

    folder.mkdir(parents=True, exist_ok=True)
    demo_image().save(folder / "frame.png")
    job = {"id": "policy", "mode": "policy", "prompt": "Pick up the dark block.", "image": "frame.png",
           "domain": "bridge_orig_lerobot", "chunk": 8, "resolution_tier": 256, "steps": steps, "fps": 8,
           "seed": 0, "samples": samples}
    path = folder / f"jobs-{samples}.jsonl"
    path.write_text(json.dumps(job) + "\n")
    return path


def measure(checkpoint: Path, work: Path, batch_size: int, samples: int, steps: int, mesh: str | None) -> dict:
    """Compile on a batch's worth of samples, then time `samples` episodes; the report's numbers."""
    import jax
    import jax.numpy as jnp

    from cosmos_jax.sampling.generate import Cosmos3Pipeline
    from cosmos_jax.sdg.engine import Settings
    from cosmos_jax.sdg.run import run_sdg
    from cosmos_jax.sharding import load_mesh_preset, make_mesh

    pipeline = Cosmos3Pipeline.from_pretrained(checkpoint, dtype=jnp.float32, attention="xla")
    if mesh is not None:
        pipeline = pipeline.on_mesh(make_mesh(mesh, jax.local_devices()), load_mesh_preset("tiny").rules)
    settings = Settings(batch_size=batch_size)
    tag = f"b{batch_size}-{mesh or 'one'}".replace("=", "")
    quiet = lambda message: None  # noqa: E731
    run_sdg(checkpoint, _jobs(work, batch_size, steps), work / f"warm-{tag}", settings, pipeline=pipeline,
            progress=False, say=quiet)
    start = time.perf_counter()
    report = run_sdg(checkpoint, _jobs(work, samples, steps), work / f"timed-{tag}", settings, pipeline=pipeline,
                     progress=False, say=quiet)
    wall = time.perf_counter() - start
    generation = report["seconds"] - report["consistency_seconds"]
    return {"batch_size": batch_size, "devices": len(jax.local_devices()) if mesh else 1, "samples": samples,
            "episodes_per_second": report["episodes"] / report["seconds"],
            "episodes_per_second_without_consistency": report["episodes"] / generation,
            "consistency_fraction_of_generation": report["consistency_fraction_of_generation"],
            "wall_seconds_with_merge": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--devices", type=int, nargs="*", default=[2, 4], help="fake CPU device counts (> 1)")
    parser.add_argument("--checkpoint", default=None, help="demo checkpoint folder (built when missing)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from cosmos_jax.demo import build_demo_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_sdg-") as tmp:
        checkpoint = Path(args.checkpoint or Path(tmp) / "checkpoint")
        build_demo_checkpoint(checkpoint)
        if args.child is not None:
            print("RESULT " + json.dumps(measure(checkpoint, Path(tmp) / "work", args.child, args.samples,
                                                 args.steps, f"data={args.child}")))
            return
        rows = [measure(checkpoint, Path(tmp) / "work", b, args.samples, args.steps, None) for b in args.batch_sizes]
        for devices in args.devices:
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            out = subprocess.run([sys.executable, __file__, "--child", str(devices), "--samples", str(args.samples),
                                  "--steps", str(args.steps), "--checkpoint", str(checkpoint)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.split("RESULT ", 1)[1]))
    print(f"cpu: {platform.processor() or platform.machine()}; policy chunk 8, {args.steps} steps, "
          f"{args.samples} episodes per setting")
    print("| batch | devices | episodes/s | episodes/s without consistency | consistency / generation |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['devices']} | {r['episodes_per_second']:.3f} | "
              f"{r['episodes_per_second_without_consistency']:.3f} | {r['consistency_fraction_of_generation']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

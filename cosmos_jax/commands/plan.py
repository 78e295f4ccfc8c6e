"""`cosmos-jax plan`: per-device memory of a config on a mesh, for inference or training (nothing allocated).

The plan compiles on a fake CPU mesh of the mesh's size, which needs XLA_FLAGS set before jax starts; the
command therefore re-runs itself in a subprocess with that flag (and JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from cosmos_jax.commands.errors import report

_CHILD_ENV = "COSMOS_JAX_PLAN_CHILD"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU upcasts bf16 matmuls to f32; loop-invariant code motion would then hoist an f32 copy of every scanned
# weight stack out of the layer loop, which no GPU/TPU compile does. Keep the converts inside the loop.
_CPU_FLAGS = ["--xla_disable_hlo_passes=while-loop-invariant-code-motion"]
# The largest meshes built today (TPU v5p pods) have under 9,000 chips; past this the fake CPU mesh is hopeless.
MAX_DEVICES = 16384
EXIT_DOES_NOT_FIT = 1
EPILOG = """\
examples:
  cosmos-jax plan --config tiny --mesh fsdp=2
  cosmos-jax plan --config nano --mesh fsdp=8 --device h100-80g --task train

Exit status: 0 when the plan FITS the device, 1 when it DOES NOT FIT, 2 on bad input.

plan does not warm the compile cache: it compiles for fake CPU devices in a child process with its own XLA
flags, and JAX keys cached programs by device and flags, so no real run would ever load them. Warm the cache
on the machine that runs, with `generate --warm-only` or `sdg --warm-only` and the run's own flags."""


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--config", required=True, help="preset name (tiny, edge, nano, super) or a config.json path")
    parser.add_argument("--mesh", default=None,
                        help="mesh spec such as fsdp=8,tensor=4 (axes data, fsdp, context, tensor); "
                             "default: the preset's reference mesh in configs/mesh/")
    parser.add_argument("--rules", default=None,
                        help="sharding rules preset name or JSON path (default: the config's preset, else nano)")
    parser.add_argument("--task", choices=("infer", "train"), default="infer",
                        help="infer: one denoising step's forward; train: a train step with AdamW state")
    parser.add_argument("--tokens", type=int, default=44160,
                        help="generator (video) tokens; default 44160 = 720p, 189 frames")
    parser.add_argument("--text-tokens", type=int, default=300, help="reasoner (prompt) tokens")
    parser.add_argument("--batch", type=int, default=None,
                        help="infer: samples of one batched generation loop, padded to a multiple of the data axis, "
                             "2 guidance rows each (default 1); train: rows (default data*fsdp)")
    parser.add_argument("--device", default="h100-80g",
                        help="device to check the fit against: h100-80g, h200-141g, b200-180g, v5p-95g, v5e-16g")
    parser.add_argument("--quantize", default=None, metavar="MODE",
                        help="inference with weight-only quantized layer linears: int8 or fp8 (default bf16)")
    parser.add_argument("--offload-reasoner", action="store_true",
                        help="inference with the towers taking turns on the device (generate --offload-reasoner)")
    parser.add_argument("--query-chunk", type=int, default=256,
                        help="generator queries per rematerialised attention chunk")


def _preset_name(config: str) -> str:
    return os.path.basename(config).removesuffix(".json")


def _child_argv(args: argparse.Namespace, mesh: str, rules: str) -> list[str]:
    argv = ["plan", "--config", args.config, "--mesh", mesh, "--rules", rules, "--task", args.task,
            "--tokens", str(args.tokens), "--text-tokens", str(args.text_tokens), "--device", args.device,
            "--query-chunk", str(args.query_chunk)]
    if args.batch is not None:
        argv += ["--batch", str(args.batch)]
    if args.quantize is not None:
        argv += ["--quantize", args.quantize]
    if args.offload_reasoner:
        argv += ["--offload-reasoner"]
    return argv


def _resolve_rules(args: argparse.Namespace):
    from cosmos_jax.sharding import MESH_PRESETS_DIR, load_mesh_preset

    name = args.rules
    if name is None:
        name = _preset_name(args.config)
        if not os.path.isfile(os.path.join(MESH_PRESETS_DIR, f"{name}.json")):
            name = "nano"
    return name, load_mesh_preset(name)


def run(args: argparse.Namespace) -> int:
    from cosmos_jax.config import load_preset
    from cosmos_jax.convert.quantize import check_mode
    from cosmos_jax.sharding import MeshSpecError, mesh_size

    try:
        check_mode(args.quantize)
        if args.quantize is not None and args.task != "infer":
            raise ValueError("--quantize plans inference only (training keeps full-precision weights)")
        if args.offload_reasoner and args.task != "infer":
            raise ValueError("--offload-reasoner plans inference only")
        load_preset(args.config)
        rules_name, preset = _resolve_rules(args)
        mesh = args.mesh or preset.mesh
        devices = mesh_size(mesh)
        for flag, value in (("--tokens", args.tokens), ("--text-tokens", args.text_tokens),
                            ("--query-chunk", args.query_chunk), ("--batch", args.batch)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if devices > MAX_DEVICES:
            raise ValueError(f"--mesh {mesh!r} needs {devices:,} devices; plans are made for at most "
                             f"{MAX_DEVICES:,}")
    except MeshSpecError as e:
        return report(f"--mesh: {e}")
    except ValueError as e:
        return report(e)
    if os.environ.get(_CHILD_ENV) != str(devices):
        env = dict(os.environ)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
        env["XLA_FLAGS"] = " ".join(flags + _CPU_FLAGS + [f"{_DEVICE_FLAG}={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
        env[_CHILD_ENV] = str(devices)
        command = [sys.executable, "-m", "cosmos_jax.cli", *_child_argv(args, mesh, rules_name)]
        code = subprocess.run(command, env=env, check=False).returncode
        if code not in (0, EXIT_DOES_NOT_FIT, 2):
            return report(f"planning --mesh {mesh} on {devices} fake CPU devices failed (exit status {code}); "
                          "try a smaller --mesh, --tokens or --batch")
        return code
    return _plan_here(args, mesh, preset.rules)


def _plan_here(args: argparse.Namespace, mesh: str, rules) -> int:
    from cosmos_jax.config import ConfigError, load_preset
    from cosmos_jax.plan import format_plan, plan_memory
    from cosmos_jax.sharding import mesh_size

    try:
        cfg = load_preset(args.config)
        plan = plan_memory(cfg, _preset_name(args.config), mesh, rules, args.task, gen_tokens=args.tokens,
                           text_tokens=args.text_tokens, batch=args.batch, device=args.device,
                           query_chunk=args.query_chunk, quantize=args.quantize,
                           offload_reasoner=args.offload_reasoner)
    except (ConfigError, ValueError) as e:
        return report(e)
    print(format_plan(plan))
    if mesh_size(mesh) > 1 and plan.replicated_share > 0.99:
        print(f"warning: --mesh {mesh} shards almost nothing: {plan.replicated_share:.1%} of the parameter bytes "
              "stay replicated on every device (their dimensions do not divide by the mesh axes)", file=sys.stderr)
    return 0 if plan.fits else EXIT_DOES_NOT_FIT

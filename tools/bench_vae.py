"""Wan VAE decode: memory versus frame count and tiling, and JAX versus the diffusers PyTorch reference.

    python tools/bench_vae.py [--latent-frames 4 16] [--latent-size 4 4] [--base-dim 32] [--decoder-base-dim 64]
                              [--repeats 2] [--tiling TH TW SH SW] [--no-torch]
                              [--plan-latent-size 30 52 --plan-frames 2 8 16 32]

Every (backend, latent frame count) case runs in its own subprocess on the same random weights and latents. Each
reports the process peak RSS (`ru_maxrss`: weights, compile and decode together), the decode working set (the
highest RSS sampled every 2 ms during the timed decodes minus the RSS just before them), for JAX the scratch
memory XLA plans for the decode (`decode_memory_plan`), and the median decode time after one warm-up call (which
compiles, for JAX). `--tiling` adds a tiled JAX case (tile and stride in pixels, as diffusers' `enable_tiling`).
Prints one markdown table and the JAX/torch time ratios.

`--plan-latent-size` instead prints what XLA plans (no weights, no data; compile only) for decoding at the
published Cosmos 3 widths: scratch, carried caches and output per latent frame count, untiled and, with
`--tiling`, tiled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

MIB = 1024 * 1024


def _tiny_config(args: argparse.Namespace) -> Any:
    from cosmos_jax.modeling.wan_vae import WanVAEConfig

    return WanVAEConfig(base_dim=args.base_dim, decoder_base_dim=args.decoder_base_dim)


def _tiling(args: argparse.Namespace) -> Any:
    from cosmos_jax.modeling.wan_vae_tiling import VAETiling

    return VAETiling(*args.tiling) if args.tiling else None


def _peak_rss_while(fn: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """Run `fn` `repeats` times; returns (median seconds, RSS before in MiB, highest sampled RSS in MiB)."""
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    running = [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    running[0] = False
    sampler.join()
    return statistics.median(times), before / MIB, peak[0] / MIB


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One subprocess: build the weights, decode once to warm up, then time and sample memory."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan

    config = _tiny_config(args)
    torch.manual_seed(0)
    reference = AutoencoderKLWan(**config.to_dict()).eval()
    h, w = args.latent_size
    latents = np.random.default_rng(0).standard_normal((1, config.z_dim, args.case_frames, h, w)).astype(np.float32)

    def xla_temp_mib() -> float:
        return float("nan")

    if args.case == "torch":
        z = torch.from_numpy(latents)

        def decode_once() -> Any:
            with torch.no_grad():
                return reference.decode(z).sample.numpy()

    else:
        import jax

        from cosmos_jax.convert.keymap_vae import vae_params_from_torch_state
        from cosmos_jax.modeling.wan_vae import decode, decode_memory_plan

        state = {k: v.numpy() for k, v in reference.state_dict().items()}
        params = jax.device_put(vae_params_from_torch_state(state, config))
        del reference, state
        z = jax.device_put(latents)
        tiling = _tiling(args) if args.case == "jax-tiled" else None

        def decode_once() -> Any:
            return np.asarray(jax.block_until_ready(decode(params, z, config, tiling=tiling)))

        def xla_temp_mib() -> float:
            return decode_memory_plan(config, latents.shape, tiling=tiling)["temp_bytes"] / MIB

    start = time.perf_counter()
    out = decode_once()
    warmup = time.perf_counter() - start
    output_mib = out.nbytes / MIB
    del out
    seconds, before, peak = _peak_rss_while(decode_once, args.repeats)
    return {
        "case": args.case, "latent_frames": args.case_frames, "video_frames": 1 + 4 * (args.case_frames - 1),
        "output_mib": output_mib, "warmup_s": warmup, "decode_s": seconds, "xla_temp_mib": xla_temp_mib(),
        "working_set_mib": peak - before, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def _spawn(args: argparse.Namespace, case: str, frames: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--case", case, "--case-frames", str(frames),
               "--latent-size", *map(str, args.latent_size), "--base-dim", str(args.base_dim),
               "--decoder-base-dim", str(args.decoder_base_dim), "--repeats", str(args.repeats)]  # fmt: skip
    if args.tiling:
        command += ["--tiling", *map(str, args.tiling)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_plans(args: argparse.Namespace) -> None:
    """XLA's plan for decoding at the published widths, per latent frame count, untiled and tiled."""
    from cosmos_jax.modeling.wan_vae import WanVAEConfig, decode_memory_plan

    config, (h, w) = WanVAEConfig(), args.plan_latent_size
    s = config.spatial_compression
    print(f"Wan VAE decode memory plan (XLA, {platform.machine()}), published Cosmos 3 VAE widths, fp32, batch 1, "
          f"latents 48x{h}x{w} -> video {s * h}x{s * w}; parameters "
          f"{decode_memory_plan(config, (1, 48, 1, 1, 1))['param_bytes'] / MIB:.0f} MiB\n")
    print("| tiling | latent frames | video frames | output MiB | carried caches MiB | XLA scratch MiB "
          "| tile buffers MiB | total without params MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for tiling in (None, _tiling(args)) if args.tiling else (None,):
        for frames in args.plan_frames:
            plan = {k: v / MIB for k, v in decode_memory_plan(config, (1, 48, frames, h, w), tiling=tiling).items()}
            total = plan["output_bytes"] + plan["cache_bytes"] + plan["temp_bytes"] + plan["tile_buffer_bytes"]
            name = "none" if tiling is None else "{}x{} every {}x{}".format(*args.tiling)
            print(f"| {name} | {frames} | {1 + 4 * (frames - 1)} | {plan['output_bytes']:.0f} "
                  f"| {plan['cache_bytes']:.0f} | {plan['temp_bytes']:.0f} | {plan['tile_buffer_bytes']:.0f} "
                  f"| {total:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-frames", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--latent-size", type=int, nargs=2, default=[4, 4], metavar=("H", "W"))
    parser.add_argument("--base-dim", type=int, default=32, help="encoder width (160 in the real model)")
    parser.add_argument("--decoder-base-dim", type=int, default=64, help="decoder width (256 in the real model)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiling", type=int, nargs=4, metavar=("TH", "TW", "SH", "SW"),
                        help="also decode in tiles of TH x TW pixels every SH x SW pixels")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference cases")
    parser.add_argument("--plan-latent-size", type=int, nargs=2, metavar=("H", "W"),
                        help="print XLA's memory plan at the published widths for this latent size instead")
    parser.add_argument("--plan-frames", type=int, nargs="+", default=[2, 8, 16, 32])
    parser.add_argument("--case", choices=["jax", "jax-tiled", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--case-frames", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    if args.plan_latent_size:
        print_plans(args)
        return

    cases = ["jax"] + (["jax-tiled"] if args.tiling else []) + ([] if args.no_torch else ["torch"])
    rows = [_spawn(args, case, frames) for frames in args.latent_frames for case in cases]
    h, w = args.latent_size
    tiles = "; tiles {}x{} px every {}x{} px".format(*args.tiling) if args.tiling else ""
    print(f"Wan VAE decode, base_dim {args.base_dim} / decoder_base_dim {args.decoder_base_dim}, latents "
          f"48x{h}x{w} -> video {16 * h}x{16 * w}, fp32, batch 1{tiles}; "
          f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores\n")
    print("| backend | latent frames | video frames | output MiB | XLA scratch MiB | decode working set MiB "
          "| process peak RSS MiB | first call s | decode s (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        temp = "n/a" if r["case"] == "torch" else f"{r['xla_temp_mib']:.1f}"
        print(f"| {r['case']} | {r['latent_frames']} | {r['video_frames']} | {r['output_mib']:.1f} | {temp} "
              f"| {r['working_set_mib']:.1f} | {r['peak_rss_mib']:.0f} | {r['warmup_s']:.2f} | {r['decode_s']:.3f} |")
    print()
    row = {(r["case"], r["latent_frames"]): r for r in rows}
    if "torch" in cases:
        for frames in args.latent_frames:
            ratio = row["jax", frames]["decode_s"] / row["torch", frames]["decode_s"]
            print(f"- {frames} latent frames: JAX/torch decode time ratio {ratio:.2f}")
    first, last = args.latent_frames[0], args.latent_frames[-1]
    for case in cases:
        a, b = row[case, first], row[case, last]
        print(f"- {case}: peak RSS grows {b['peak_rss_mib'] - a['peak_rss_mib']:.1f} MiB from {first} to {last} "
              f"latent frames; the output grows {b['output_mib'] - a['output_mib']:.1f} MiB")


if __name__ == "__main__":
    main()

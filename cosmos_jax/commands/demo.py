"""`cosmos-jax demo`: the full pipeline on the embedded tiny random checkpoint (a video, an action plot, a report)."""

from __future__ import annotations

import argparse
import os

from cosmos_jax.commands import errors


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help="output folder (default: ~/.cache/cosmos-jax/demo); the checkpoint is built once "
                             "under it and reused")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from cosmos_jax.compile_cache import enable as enable_compile_cache
    from cosmos_jax.demo import DEFAULT_CACHE, MODEL_DESCRIPTION, run_demo

    if args.steps < 1:
        return errors.report(f"--steps must be >= 1, got {args.steps}")
    out = args.out if args.out is not None else DEFAULT_CACHE
    try:
        errors.output_path(os.path.join(out, "report.json"), "--out")
    except ValueError as e:
        return errors.report(e)
    enable_compile_cache()
    print(f"model: {MODEL_DESCRIPTION}")
    report = run_demo(out, steps=args.steps, progress=not args.no_progress)
    print(f"checkpoint (Hub layout): {report['checkpoint']}")
    for entry in report["runs"]:
        t = entry["timings_seconds"]
        print(f"{entry['mode']}: compile {t['compile']:.1f}s, denoise {t['denoise']:.2f}s, decode {t['decode']:.1f}s")
        for path in entry["files"]:
            print(f"  {path}")
    print(f"report: {out}/report.json")
    print("note: the weights are random, so the video and actions are noise-like; the run shows the pipeline works.")
    return 0

"""`cosmos-jax export SRC DST`: a converted folder -> the Hub's layout (diffusers components and the root reasoner
files), streamed leaf by leaf."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cosmos_jax.commands import errors
from cosmos_jax.convert.export import export_converted, parse_size


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="converted folder (from `cosmos-jax convert`) or a Hub-layout folder")
    parser.add_argument("dst", type=Path, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 5GB (default, as the Hub), 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace DST (only once the export succeeded)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        errors.input_path(args.src, "SRC", folder=True)
        errors.no_symlink_loops(args.src, "SRC")
        errors.output_path(args.dst, "DST", overwrite=args.overwrite)
        try:
            max_shard = parse_size(args.max_shard_size)
        except ValueError as e:
            raise ValueError(f"--max-shard-size: {e}") from None
        files = export_converted(args.src, args.dst, max_shard_bytes=max_shard, overwrite=args.overwrite)
    except (ValueError, OSError, NotImplementedError) as e:
        return errors.report(e)
    size = sum((args.dst / f).stat().st_size for f in files)
    print(f"wrote {len(files)} files, {size / 2**20:.1f} MiB to {args.dst} in {time.perf_counter() - start:.1f} s")
    return 0

"""`cosmos-jax convert SRC DST`: a Hub-layout (safetensors) folder -> a converted (orbax) folder, through
`cosmos_jax.convert.converter.convert`, with a progress bar and a summary table. `--quantize int8|fp8` stores
the transformer's layer linears quantized (`generate --quantize` with the same mode then reads them as stored)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from cosmos_jax.commands import errors
from cosmos_jax.convert.converter import convert, format_summary, planned_bytes

DTYPES: dict[str, Any] = {"bf16": jnp.bfloat16, "fp32": np.float32, "keep": None}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="Hub-layout folder (model_index.json, transformer/, vae/, ...)")
    parser.add_argument("dst", type=Path, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST (only once the conversion succeeded)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                        help="transformer weight dtype in DST (time embedder stays fp32); default: keep as stored")
    parser.add_argument("--quantize", default=None, metavar="MODE",
                        help="store the transformer's layer linears quantized: int8 or fp8 (per output channel, "
                             "from the weights in --dtype); the folder then serves `generate --quantize MODE` only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cosmos_jax.convert.quantize import check_mode

    try:
        check_mode(args.quantize)
        errors.input_path(args.src, "SRC", folder=True)
        errors.no_symlink_loops(args.src, "SRC")
        errors.output_path(args.dst, "DST", overwrite=args.overwrite)
        args.dst = Path(os.path.abspath(args.dst))
        count, size = planned_bytes(args.src)
        with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                  disable=args.no_progress) as bar:
            done = {"tensors": 0}

            def progress(key: str, nbytes: int) -> None:
                done["tensors"] += 1
                bar.set_postfix(tensors=f"{done['tensors']}/{count}", refresh=False)
                bar.update(nbytes)

            summary = convert(args.src, args.dst, dtype=DTYPES[args.dtype], overwrite=args.overwrite,
                              progress=progress, quantize=args.quantize)
    except (ValueError, OSError, NotImplementedError) as e:
        return errors.report(e)
    print(format_summary(summary))
    print(f"wrote {args.dst}")
    return 0

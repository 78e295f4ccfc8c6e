"""`cosmos-jax export SRC DST`: a converted folder -> the Hub's layout (diffusers components and the root reasoner
files), streamed leaf by leaf. `cosmos-jax export --lora ADAPTER DST --config MODEL`: a LoRA folder (from `train
--lora-rank`) -> DST/pytorch_lora_weights.safetensors in the PEFT/diffusers key layout."""

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
    parser.add_argument("--lora", action="store_true",
                        help="SRC is a LoRA adapter folder: write DST/pytorch_lora_weights.safetensors (PEFT keys) "
                             "for diffusers' Cosmos3OmniTransformer.load_lora_adapter; needs --config")
    parser.add_argument("--config", default=None,
                        help="with --lora: the model the adapters belong to (preset, config.json or model folder)")


def _export_lora(args: argparse.Namespace) -> list[str]:
    import os

    from safetensors.numpy import save

    from cosmos_jax.config import load_preset
    from cosmos_jax.convert.lora_peft import FILE_NAME, peft_state
    from cosmos_jax.training.lora import adapter_paths, load_adapters

    if args.config is None:
        raise ValueError("--lora needs --config (the model the adapters belong to)")
    config_path = Path(args.config) / "transformer" / "config.json"
    config = load_preset(str(config_path) if config_path.is_file() else args.config)
    saved = load_adapters(args.src)
    if args.dst.exists() and not args.overwrite and (args.dst / FILE_NAME).exists():
        raise ValueError(f"{args.dst / FILE_NAME} exists (use --overwrite)")
    state = peft_state(saved.adapters, adapter_paths(saved.adapters), saved.config.scale, config)
    args.dst.mkdir(parents=True, exist_ok=True)
    tmp = args.dst / f".{FILE_NAME}.tmp"
    tmp.write_bytes(save(state))
    os.replace(tmp, args.dst / FILE_NAME)
    return [FILE_NAME]


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        errors.input_path(args.src, "SRC", folder=True)
        errors.no_symlink_loops(args.src, "SRC")
        errors.output_path(args.dst, "DST", overwrite=args.overwrite)
        if args.lora:
            files = _export_lora(args)
        else:
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

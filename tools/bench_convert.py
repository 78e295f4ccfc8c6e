"""Benchmark `cosmos-jax convert` on a synthetic >= 2 GB bf16 transformer checkpoint: throughput and peak RSS.

The checkpoint (narrow and deep: hidden 512, many layers, small vocab) is generated tensor by tensor in a child
process and written with `write_checkpoint` from an iterator, so the writer holds at most one shard. The
conversion runs in another fresh child that reports its peak RSS (`VmHWM`, and `getrusage(RUSAGE_SELF).ru_maxrss`,
which Linux carries over from the parent at fork, hence the small parent) and its RSS right before the
conversion starts (interpreter + JAX + orbax: the fixed overhead). The check:

    peak RSS < 1.5 x largest stacked parameter + fixed overhead + slack

Usage: python tools/bench_convert.py [--layers 80] [--intermediate 4096] [--workdir /tmp] [--max-shard-size 5GB]
Everything written is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from cosmos_jax.config import Cosmos3Config, param_dtype
from cosmos_jax.convert.export import parse_size
from cosmos_jax.convert.keymap_transformer import key_table
from cosmos_jax.convert.safetensors_io import write_checkpoint
from cosmos_jax.convert.load import abstract_transformer

SLACK_BYTES = 64 * 2**20  # allocator and page-cache noise

CHILD = r"""
import json, resource, sys, time
from cosmos_jax.convert.converter import convert


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


import jax, orbax.checkpoint.experimental.v1  # noqa: E401  (imported before measuring the fixed overhead)
jax.devices()
baseline = status_bytes("VmRSS")
start = time.perf_counter()
summary = convert(sys.argv[1], sys.argv[2], dtype=None)
seconds = time.perf_counter() - start
print(json.dumps({"baseline_rss": baseline, "peak_rss": status_bytes("VmHWM"),
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds,
                  "bytes_read": summary.bytes_read, "tensors": summary.tensors_read}))
"""


def synthetic_config(layers: int, intermediate: int) -> Cosmos3Config:
    return Cosmos3Config(
        hidden_size=512, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, rope_axes_dim=(12, 10, 10), vocab_size=1024,
        action_gen=True, action_dim=16, num_embodiment_domains=4, sound_gen=True, sound_dim=64,
    )


def synthetic_tensors(config: Cosmos3Config, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the diffusers checkpoint, bf16 (time embedder f32, as diffusers keeps it), made one at a time.

    Values are random bit patterns: conversion copies bytes, it never does arithmetic on them.
    """
    rng = np.random.default_rng(seed)
    abstract = abstract_transformer(config)
    for entry in key_table(config):
        leaf = abstract
        for name in entry.path:
            leaf = leaf[name]
        shape = entry.torch_shape(tuple(leaf.shape[1:]) if entry.per_layer else tuple(leaf.shape))
        dtype = np.dtype(param_dtype(entry.path, ml_dtypes.bfloat16))
        for key in entry.torch_keys(config.num_hidden_layers):
            raw = rng.integers(0, 2**16, size=math.prod(shape) * dtype.itemsize // 2, dtype=np.uint16)
            raw &= 0xBFFF  # clear the top exponent bit: no inf/nan patterns
            yield key, raw.view(dtype).reshape(shape)


def largest_stacked_bytes(config: Cosmos3Config) -> tuple[str, int]:
    abstract = abstract_transformer(config)
    best = ("", 0)
    for entry in key_table(config):
        if entry.per_layer:
            leaf = abstract
            for name in entry.path:
                leaf = leaf[name]
            size = math.prod(leaf.shape) * 2
            if size > best[1]:
                best = ("/".join(entry.path), size)
    return best


def write_hub(folder: Path, config: Cosmos3Config, max_shard_bytes: int) -> None:
    write_checkpoint(folder / "transformer", synthetic_tensors(config), max_shard_bytes=max_shard_bytes)
    config.to_json(folder / "transformer" / "config.json")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Cosmos3OmniPipeline"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    config = synthetic_config(args.layers, args.intermediate)
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        start = time.perf_counter()
        generate = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_convert as b; "
                    f"b.write_hub(b.Path({str(work / 'hub')!r}), b.synthetic_config({args.layers}, "
                    f"{args.intermediate}), {parse_size(args.max_shard_size)})")
        subprocess.run([sys.executable, "-c", generate], check=True)
        src_bytes = sum(p.stat().st_size for p in (work / "hub" / "transformer").glob("*.safetensors"))
        shards = len(list((work / "hub" / "transformer").glob("*.safetensors")))
        print(f"wrote {src_bytes / 2**30:.2f} GiB in {shards} shard(s) in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        child = subprocess.run([sys.executable, "-c", CHILD, str(work / "hub"), str(work / "converted")],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        result = json.loads(child.stdout.strip().splitlines()[-1])
        dst_bytes = sum(p.stat().st_size for p in (work / "converted").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name, largest = largest_stacked_bytes(config)
    bound = 1.5 * largest + result["baseline_rss"] + SLACK_BYTES
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    rows = [
        ("checkpoint", f"{src_bytes / 2**30:.2f} GiB bf16, {shards} shard(s), {result['tensors']} tensors, "
                       f"hidden 512, {args.layers} layers, intermediate {args.intermediate}"),
        ("converted size", f"{dst_bytes / 2**30:.2f} GiB"),
        ("time", f"{result['seconds']:.1f} s"),
        ("throughput", f"{result['bytes_read'] / 1e6 / result['seconds']:.0f} MB/s"),
        ("largest stacked parameter", f"{mib(largest)} ({name})"),
        ("fixed overhead (child RSS before converting)", mib(result["baseline_rss"])),
        ("peak RSS (child VmHWM)", mib(result["peak_rss"])),
        ("child ru_maxrss", mib(result["ru_maxrss"])),
        ("bound: 1.5 x largest + overhead + 64 MiB", mib(bound)),
        ("(peak RSS - overhead) / largest stacked parameter",
         f"{(result['peak_rss'] - result['baseline_rss']) / largest:.2f}"),
        ("peak RSS / whole checkpoint", f"{result['peak_rss'] / src_bytes:.2f}"),
        ("within bound", "yes" if result["peak_rss"] < bound else "NO"),
    ]
    print("| quantity | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    return 0 if result["peak_rss"] < bound else 1


if __name__ == "__main__":
    sys.exit(main())

"""The model-loading options `generate`, `sdg` and `serve` share: --quantize, --lora, --merge-lora,
--offload-reasoner.

`add_model_arguments` adds the flags; `check_model_arguments` refuses bad values and combinations and reads
every --lora folder, before anything loads (ValueError or FileNotFoundError naming the flag: the CLI prints
`error: ...`, exit 2); `load_pipeline` loads the model with them (quantized or offloaded as asked, adapters
attached or merged). `ModelOptions.record` is what of them changes the weights, as JSON (sdg hashes it into
the model fingerprint and writes it beside every episode; serve reports it on /healthz).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from typing import Any

_QUANTIZE_HELP = ("weight-only quantization of the transformer's layer linears: int8 or fp8 (per output channel; "
                  "norms, embeddings, time embedder and heads stay full precision); a folder from `convert "
                  "--quantize MODE` needs its own MODE and is read as stored")
_OFFLOAD_HELP = ("keep the towers in host memory between uses: the reasoner comes to the device for the prompt's "
                 "K/V, then the generator for the denoising loop (less device memory, same outputs)")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One --lora: the value as given, its folder (absolute), its scale, the read adapter and the sha256 of its
    folder's files."""

    value: str
    path: str
    scale: float
    saved: Any
    sha256: str


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The checked model-loading options of one command line."""

    quantize: str | None = None
    adapters: tuple[Adapter, ...] = ()
    merge_lora: bool = False
    offload_reasoner: bool = False

    @property
    def changes_weights(self) -> bool:
        """True when the loaded weights differ from the folder's (quantized, or with adapters)."""
        return self.quantize is not None or bool(self.adapters)

    def record(self) -> dict[str, Any]:
        """{"quantize", "lora": [{"path", "scale", "sha256"}], "merge_lora"}: what changes the weights.
        (--offload-reasoner only moves them between host and device, so it is not part of it.)"""
        return {"quantize": self.quantize, "merge_lora": self.merge_lora,
                "lora": [{"path": a.path, "scale": a.scale, "sha256": a.sha256} for a in self.adapters]}

    def report(self) -> dict[str, Any]:
        """`record()` and offload_reasoner: every option, as a server reports them."""
        return {**self.record(), "offload_reasoner": self.offload_reasoner}

    def flags(self) -> list[str]:
        """The command-line flags that load the same model (e.g. ["--quantize", "int8"])."""
        out = ["--quantize", self.quantize] if self.quantize else []
        for adapter in self.adapters:
            out += ["--lora", f"{adapter.path}:{adapter.scale!r}"]
        out += ["--merge-lora"] * self.merge_lora + ["--offload-reasoner"] * self.offload_reasoner
        return out


def add_model_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """--quantize, --lora (repeatable), --merge-lora and --offload-reasoner on `parser` (or an argument group)."""
    parser.add_argument("--quantize", default=None, metavar="MODE", help=_QUANTIZE_HELP)
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA folder from `cosmos-jax train --lora-rank` (repeat for several; SCALE "
                             "multiplies its update, default 1)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold the --lora updates into the weights once (default: applied per layer each step)")
    parser.add_argument("--offload-reasoner", action="store_true", help=_OFFLOAD_HELP)


def check_model_arguments(args: argparse.Namespace) -> ModelOptions:
    """The options of parsed arguments, checked (values, combinations, --quantize against a folder stored
    quantized) and every --lora folder read; ValueError or FileNotFoundError naming the flag. Loads no model."""
    from cosmos_jax.convert.load import check_quantize
    from cosmos_jax.convert.quantize import check_mode

    check_mode(args.quantize)
    if args.merge_lora and not args.lora:
        raise ValueError("--merge-lora needs at least one --lora")
    if args.lora and args.quantize:
        raise ValueError("--lora cannot be combined with --quantize (adapters are checked against full-precision "
                         "base weights)")
    if args.lora and args.offload_reasoner:
        raise ValueError("--lora cannot be combined with --offload-reasoner yet (use --merge-lora on a converted "
                         "copy instead)")
    check_quantize(args.model, args.quantize, "--quantize ")
    return ModelOptions(args.quantize, tuple(_read_adapter(value) for value in args.lora), args.merge_lora,
                        args.offload_reasoner)


def _read_adapter(value: str) -> Adapter:
    from cosmos_jax.training.lora import ADAPTER_FILE, CONFIG_FILE, load_adapters, parse_lora_arg

    path, scale = parse_lora_arg(value)
    saved = load_adapters(path)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, ADAPTER_FILE):
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return Adapter(value, os.path.abspath(path), scale, saved, digest.hexdigest())


def load_pipeline(args: argparse.Namespace, options: ModelOptions, *, mesh: Any = None, rules: Any = None,
                  load_sharded: bool = True) -> Any:
    """`Cosmos3Pipeline` of `args.model` in `args.dtype` with `args.attention`, quantized or offloaded as
    `options` say, on `mesh` under `rules` when given, with the adapters attached (or merged). load_sharded:
    every device reads only its slice; False loads on one device, then moves the weights onto the mesh."""
    import jax.numpy as jnp

    from cosmos_jax.sampling.generate import Cosmos3Pipeline

    pipeline = Cosmos3Pipeline.from_pretrained(
        args.model, dtype=getattr(jnp, args.dtype), attention=args.attention,
        mesh=mesh if load_sharded else None, rules=rules if load_sharded else None,
        quantize=options.quantize, offload_reasoner=options.offload_reasoner)
    if mesh is not None and not load_sharded:
        pipeline = pipeline.on_mesh(mesh, rules)
    if options.adapters:
        from cosmos_jax.training.lora import apply_adapters

        specs = [(a.saved, a.scale, a.value) for a in options.adapters]
        pipeline.params = apply_adapters(pipeline.params, specs, options.merge_lora)
    return pipeline

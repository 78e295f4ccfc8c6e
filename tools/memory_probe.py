"""Memory of one transformer load, and optionally one jitted joint forward, measured in this (fresh) process.

    python tools/memory_probe.py FOLDER [--quantize int8|fp8] [--step] [--text-tokens 64] [--latent 2,16,16]

Prints one JSON object on its last line:
  held         bytes of the loaded parameter tree;
  seconds      the load's wall time;
  peak         host: peak RSS above the RSS right before the load (`VmHWM - VmRSS`, with the peak counter reset
               through `/proc/self/clear_refs` once JAX and orbax are imported and the device is up);
  device       `memory_stats()` of the first device after the load (and after the step): bytes_in_use and
               peak_bytes_in_use, or null where the backend keeps none (XLA:CPU);
and with --step, one jitted joint forward of both towers (bf16, batch 1, `--text-tokens` prompt tokens and a
video latent of `--latent` T,H,W, no sound or action rows) compiled after the load:
  predicted    XLA's memory_analysis of that step: argument, output, temp and total (argument + output - alias
               + temp) bytes, the number `cosmos-jax plan` reports;
  step_peak    host: peak RSS above the RSS right before the step ran (on CPU the step's outputs and temporaries;
               on a GPU these live in device memory, read from `device.after_step.peak_bytes_in_use`);
  step_total_peak  host: peak RSS during the step above the pre-load baseline (the loaded tree, the compiled
               step and the step's own peak).
Run it in a child process per measurement (tools/bench_quantized_load.py, tools/device_check.py do): peaks are
per process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.convert.load import load
from cosmos_jax.convert.quantize import check_mode, tree_bytes


def status_bytes(field: str) -> int:
    """A `/proc/self/status` field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Set the peak-RSS counter to the current RSS and return that RSS."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return status_bytes("VmRSS")


def device_memory() -> dict[str, int] | None:
    """bytes_in_use and peak_bytes_in_use of the first device, or None where the backend keeps no stats."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return {key: int(stats[key]) for key in ("bytes_in_use", "peak_bytes_in_use") if key in stats}


def step_inputs(cfg: Any, text_tokens: int, latent: tuple[int, int, int]) -> tuple[Any, Any]:
    """TextInputs and GeneratorInputs of one row: a text prompt and a noisy video latent (bf16)."""
    from cosmos_jax.modeling.inputs import GeneratorInputs
    from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence

    layout = layout_sequence(cfg, text_tokens, latent, fps=24.0, clean_vision_frames=[0])
    text = jax.tree.map(jnp.asarray, batch_text([np.arange(text_tokens) % cfg.vocab_size], [layout]))
    gen = GeneratorInputs(
        position_ids=jnp.asarray(batch_generator_positions([layout])),
        vision=jax.random.normal(jax.random.key(1), (1, cfg.latent_channel, *latent), jnp.bfloat16),
        vision_noisy=jnp.asarray(layout.vision_noisy[None]), vision_t=jnp.full((1,), 973.0),
    )
    return text, gen


def probe(folder: str, quantize: str | None, step: bool, text_tokens: int,
          latent: tuple[int, int, int]) -> dict[str, Any]:
    """The figures the module docstring lists."""
    from cosmos_jax.modeling.transformer import Cosmos3Transformer

    importlib.import_module("orbax.checkpoint.experimental.v1")  # what load imports, before the baseline
    jax.devices()
    baseline = reset_peak()
    start = time.perf_counter()
    loaded = load(folder, dtype=jnp.bfloat16, components=("transformer",), quantize=quantize)
    params = jax.block_until_ready(loaded.params)
    report: dict[str, Any] = {"held": tree_bytes(params), "seconds": time.perf_counter() - start,
                              "peak": status_bytes("VmHWM") - baseline, "device": {"after_load": device_memory()}}
    if step:
        cfg = loaded.transformer_config
        model = Cosmos3Transformer(cfg, dtype=jnp.bfloat16, attention="auto")
        text, gen = step_inputs(cfg, text_tokens, latent)
        compiled = jax.jit(model.__call__).lower(params, text, gen).compile()
        analysis = compiled.memory_analysis()
        report["predicted"] = {
            "argument": int(analysis.argument_size_in_bytes), "output": int(analysis.output_size_in_bytes),
            "temp": int(analysis.temp_size_in_bytes),
            "total": int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                         - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)}
        before_step = reset_peak()
        jax.block_until_ready(compiled(params, text, gen))
        report["step_peak"] = status_bytes("VmHWM") - before_step
        report["step_total_peak"] = before_step - baseline + report["step_peak"]
        report["device"]["after_step"] = device_memory()
    return report


def parse_latent(text: str) -> tuple[int, int, int]:
    """"T,H,W" -> (T, H, W) of positive integers."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--latent wants T,H,W positive integers, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a Hub-layout or converted model folder")
    parser.add_argument("--quantize", default=None, choices=("int8", "fp8"), help="as `load(quantize=...)`")
    parser.add_argument("--step", action="store_true", help="also compile and run one joint forward")
    parser.add_argument("--text-tokens", type=int, default=64, help="prompt tokens of the step (default 64)")
    parser.add_argument("--latent", type=parse_latent, default=(2, 16, 16), help="T,H,W of the step's latent")
    args = parser.parse_args(argv)
    check_mode(args.quantize)
    print(json.dumps(probe(args.folder, args.quantize, args.step, args.text_tokens, args.latent)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

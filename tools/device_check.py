"""One device check for the first session with a GPU: kernel speed, a Nano-width denoising step, parity.

    python tools/device_check.py                 # on an H100/H200 (about 5 minutes); writes device_check/
    python tools/device_check.py --dry-run       # tiny shapes, Pallas in interpret mode, on CPU (the test suite)

Writes `<out>/device_check.json` and `<out>/device_check.md` (one Markdown table per section):
  1. the Pallas joint-attention kernel, forward and forward+backward, bf16, at Nano's head layout (32 query
     heads, 8 kv heads, head_dim 128) for the generator pass at 44,160 tokens (720p) and 11,040 tokens (480p)
     over 300 reasoner tokens, beside `jax.nn.dot_product_attention` (cudnn, and xla where its logits fit) and
     the pure-XLA blocked path. TFLOP/s count only unmasked work (4·H·D per visible query-key pair, x3.5 with
     the backward pass); the fraction is of the card's bf16 dense peak;
  2. a Nano-width layer stack (a few of the 36 layers, bf16) for one cached denoising step at 44k tokens with
     both guidance branches, extrapolated to 36 layers x 35 steps, beside NVIDIA's published H100 times;
  3. bf16 kernel parity against the f32 XLA reference, and the tiny pipeline (the embedded demo checkpoint, f32)
     run end to end on the device against the same run on the CPU;
  4. memory: a synthetic transformer (tools/bench_convert.py's) converted as bf16, int8 and fp8 folders, each
     loaded in a fresh child (tools/memory_probe.py) that then runs one joint forward: the tree's bytes, the
     host and device peaks of the load, XLA's predicted bytes for the step and the device's measured peak.
A Pallas kernel that does not lower or compile fails the script (non-zero exit); nothing is skipped silently.
Baselines that cannot run (cudnn on a card without it, XLA logits that would not fit) are recorded with why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench_attention import Case, make_inputs
from timing import median_seconds

# bf16 dense tensor-core peak (no sparsity), TFLOP/s, by device-kind substring.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0}
# NVIDIA's published Cosmos 3 Nano 720p text->video times on one H100 (35 steps, CFG), seconds.
PUBLISHED_H100_SECONDS = {"diffusers": 240.0, "cosmos-framework": 207.8, "vLLM-Omni": 202.3}
NANO_LAYERS, NANO_STEPS = 36, 35
# bf16 inputs vs the f32 reference on the same bf16-rounded values (as tests/test_pallas_attention.py)
KERNEL_TOLERANCE, GRADIENT_TOLERANCE = 3e-2, 6e-2
PIPELINE_TOLERANCE = 1e-3  # f32 pipeline, device vs CPU, max abs difference over the latents' scale


@dataclasses.dataclass(frozen=True)
class CheckSizes:
    """What to measure: kernel cases, the layer stack's shape, and how many timing repeats."""

    kernel_cases: tuple[Case, ...]
    parity_case: Case
    stack_layers: int
    stack_latent: tuple[int, int, int]
    stack_text: int
    config: str
    repeats: int
    memory_layers: int
    memory_intermediate: int
    memory_text: int
    memory_latent: tuple[int, int, int]
    memory_weights: tuple[str, ...]


def full_sizes() -> CheckSizes:
    heads = dict(heads=32, kv_heads=8, head_dim=128)
    return CheckSizes(
        kernel_cases=(
            Case("720p: 44,160 generator + 300 reasoner", "generator", 1, 300, 44160, **heads),
            Case("480p: 11,040 generator + 300 reasoner", "generator", 1, 300, 11040, **heads),
        ),
        parity_case=Case("parity: 2,048 generator + 300 reasoner", "generator", 1, 300, 2048, **heads),
        stack_layers=4, stack_latent=(48, 46, 80), stack_text=300, config="nano", repeats=5,
        memory_layers=8, memory_intermediate=2048, memory_text=300, memory_latent=(16, 46, 80),
        memory_weights=("bf16", "int8", "fp8"),
    )


def dry_sizes() -> CheckSizes:
    heads = dict(heads=4, kv_heads=2, head_dim=64)
    return CheckSizes(
        kernel_cases=(Case("dry run: 80 generator + 20 reasoner", "generator", 1, 20, 80, **heads),),
        parity_case=Case("dry run parity: 48 generator + 20 reasoner", "generator", 1, 20, 48, **heads),
        stack_layers=1, stack_latent=(2, 4, 4), stack_text=8, config="tiny", repeats=2,
        memory_layers=2, memory_intermediate=512, memory_text=8, memory_latent=(2, 4, 4),
        memory_weights=("bf16", "int8"),  # the dry run checks the script; the GPU run measures all three
    )


def _peak(kind: str) -> float | None:
    return next((peak for name, peak in BF16_PEAK_TFLOPS.items() if name in kind), None)


def _timed(fn, args: tuple, repeats: int) -> float:
    """Median seconds of a jitted call after a compile + warm-up call."""
    compiled = jax.jit(fn)
    jax.block_until_ready(compiled(*args))
    return median_seconds(lambda: jax.block_until_ready(compiled(*args)), repeats)


def _with_backward(fn):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(5)))


def _generator_sdpa(implementation: str):
    """Generator attention as one unmasked dot_product_attention over the concatenated keys (full lengths)."""

    def attend(q, ku, vu, kg, vg, und_len, gen_len):
        del und_len, gen_len  # every token is valid in these cases, so no mask is needed
        keys, values = jnp.concatenate([ku, kg], axis=1), jnp.concatenate([vu, vg], axis=1)
        return jax.nn.dot_product_attention(q, keys, values, implementation=implementation)

    return attend


def kernel_rows(sizes: CheckSizes, dry_run: bool, peak: float | None) -> list[dict[str, Any]]:
    """Section 1. The Pallas rows raise on failure; baselines record why they did not run."""
    from pallas_kernels import joint_attention
    from pallas_kernels.xla import blocked

    rows = []
    for case in sizes.kernel_cases:
        args = make_inputs(case, jnp.bfloat16)
        impls = {"pallas kernel": joint_attention.generator_attention, "blocked xla": blocked.generator_attention}
        if not dry_run:
            impls["dot_product_attention (cudnn)"] = _generator_sdpa("cudnn")
            if 4 * case.logits_bytes() < 0.5 * _device_memory_bytes():
                impls["dot_product_attention (xla)"] = _generator_sdpa("xla")
            else:
                rows.append(dict(case=case.name, impl="dot_product_attention (xla)", pass_="fwd / fwd+bwd",
                                 ms=None, tflops=None, of_peak=None,
                                 note=f"not run: its f32 logits alone need {case.logits_bytes() / 2**30:.0f} GiB"))
        for name, fn in impls.items():
            for pass_, call, factor in (("fwd", fn, 1.0), ("fwd+bwd", _with_backward(fn), 3.5)):
                try:
                    seconds = _timed(call, args, sizes.repeats)
                except Exception as error:  # noqa: BLE001 - only baselines may fail; the kernel re-raises
                    if name == "pallas kernel":
                        raise RuntimeError(f"the Pallas kernel failed ({case.name}, {pass_}): {error}") from error
                    rows.append(dict(case=case.name, impl=name, pass_=pass_, ms=None, tflops=None, of_peak=None,
                                     note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}"))
                    continue
                tflops = case.flops() * factor / seconds / 1e12
                rows.append(dict(case=case.name, impl=name, pass_=pass_, ms=seconds * 1e3, tflops=tflops,
                                 of_peak=None if peak is None else tflops / peak, note=""))
    return rows


def _device_memory_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_limit", 16 * 2**30))


def parity_rows(sizes: CheckSizes) -> list[dict[str, Any]]:
    """Section 3a: the bf16 kernel (forward and gradients) against the f32 XLA reference on the same values."""
    from pallas_kernels import joint_attention
    from pallas_kernels.reference import generator_attention_reference

    case = sizes.parity_case
    args = make_inputs(case, jnp.bfloat16, seed=3)
    args = args[:-2] + (args[-2], args[-1].at[0].set(case.gen * 3 // 4))  # a padded tail
    f32 = tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in args)
    out = jax.jit(joint_attention.generator_attention)(*args).astype(jnp.float32)
    ref = jax.jit(generator_attention_reference)(*f32)
    grads = jax.jit(_with_backward(joint_attention.generator_attention))(*args)
    ref_grads = jax.jit(_with_backward(generator_attention_reference))(*f32)
    rows = [(f"{case.name}: output", float(jnp.max(jnp.abs(out - ref))), KERNEL_TOLERANCE)]
    for name, g, r in zip(("dq", "dk_und", "dv_und", "dk_gen", "dv_gen"), grads, ref_grads):
        rows.append((f"{case.name}: {name}", float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))), GRADIENT_TOLERANCE))
    return [dict(check=check, max_abs_err=err, tolerance=tol, holds=err <= tol) for check, err, tol in rows]


def stack_row(sizes: CheckSizes) -> dict[str, Any]:
    """Section 2: one cached generator (denoising) step, both guidance branches, bf16, `stack_layers` layers."""
    from cosmos_jax.config import load_preset
    from cosmos_jax.modeling.inputs import GeneratorInputs
    from cosmos_jax.modeling.transformer import Cosmos3Transformer
    from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence

    cfg = dataclasses.replace(load_preset(sizes.config), num_hidden_layers=sizes.stack_layers)
    model = Cosmos3Transformer(cfg, dtype=jnp.bfloat16, attention="auto")
    params = jax.jit(model.init)(jax.random.key(0))
    layout = layout_sequence(cfg, sizes.stack_text, sizes.stack_latent, fps=24.0, clean_vision_frames=[0])
    ids = np.arange(sizes.stack_text) % cfg.vocab_size
    text = jax.tree.map(jnp.asarray, batch_text([ids, ids], [layout, layout]))
    gen = GeneratorInputs(
        position_ids=jnp.asarray(batch_generator_positions([layout, layout])),
        vision=jax.random.normal(jax.random.key(1), (2, cfg.latent_channel, *sizes.stack_latent), jnp.bfloat16),
        vision_noisy=jnp.asarray(np.stack([layout.vision_noisy] * 2)), vision_t=jnp.full((2,), 973.0),
    )
    cache, _ = jax.jit(model.encode_reasoner)(params, text)
    step = jax.jit(model.denoise_step)
    jax.block_until_ready(step(params, cache, gen).vision)
    seconds = median_seconds(lambda: jax.block_until_ready(step(params, cache, gen).vision), sizes.repeats)
    extrapolated = seconds * NANO_LAYERS / sizes.stack_layers * NANO_STEPS
    return dict(
        config=sizes.config, layers=sizes.stack_layers, generator_tokens=int(layout.num_gen),
        reasoner_tokens=sizes.stack_text, batch_rows=2, step_ms=seconds * 1e3,
        extrapolated_720p_seconds=extrapolated,
        versus_published={name: published / extrapolated for name, published in PUBLISHED_H100_SECONDS.items()},
        note="denoising only (36 layers x 35 steps, CFG as 2 batch rows); excludes text encoding and VAE decode",
    )


def _tiny_pipeline_latents(checkpoint: Path, attention: str) -> np.ndarray:
    from cosmos_jax.sampling.generate import Cosmos3Pipeline
    from cosmos_jax.sampling.request import GenerationRequest

    pipeline = Cosmos3Pipeline.from_pretrained(checkpoint, dtype=jnp.float32, attention=attention)
    request = GenerationRequest("A robot arm picks up a red cube.", num_frames=9, height=64, width=64, steps=3,
                                guidance=6.0, seed=0, output_type="latent")
    result = pipeline(request, progress=False)
    return np.asarray(result.latents, np.float32)


def pipeline_row(dry_run: bool) -> dict[str, Any]:
    """Section 3b: the demo checkpoint's text->video latents, f32, on the device (auto attention) vs the CPU."""
    from cosmos_jax.demo import build_demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_demo_checkpoint(Path(tmp) / "checkpoint")
        device = _tiny_pipeline_latents(checkpoint, "pallas" if dry_run else "auto")
        with jax.default_device(jax.devices("cpu")[0]):
            cpu = _tiny_pipeline_latents(checkpoint, "xla")
    err = float(np.abs(device - cpu).max() / max(float(np.abs(cpu).max()), 1e-12))
    return dict(check="tiny pipeline text->video latents, device vs CPU (f32)", max_rel_err=err,
                tolerance=PIPELINE_TOLERANCE, holds=err <= PIPELINE_TOLERANCE)


def memory_rows(sizes: CheckSizes) -> list[dict[str, Any]]:
    """Section 4: per weight format, what tools/memory_probe.py measures of one load and one joint forward."""
    import subprocess

    from bench_quantized_load import PROBE, write_folders

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_folders(Path(tmp), sizes.memory_layers, sizes.memory_intermediate,
                                conversions=sizes.memory_weights)
        for weights in sizes.memory_weights:
            argv = [sys.executable, str(PROBE), str(folders[weights]), "--step", "--text-tokens",
                    str(sizes.memory_text), "--latent", ",".join(map(str, sizes.memory_latent))]
            child = subprocess.run(argv + ([] if weights == "bf16" else ["--quantize", weights]),
                                   capture_output=True, text=True, check=False)
            if child.returncode != 0:
                raise RuntimeError(f"memory probe of the {weights} folder failed:\n{child.stderr[-3000:]}")
            probe = json.loads(child.stdout.strip().splitlines()[-1])
            after_load, after_step = probe["device"]["after_load"], probe["device"]["after_step"]
            rows.append(dict(
                weights=weights, held=probe["held"], load_host_peak=probe["peak"],
                load_device_peak=None if after_load is None else after_load.get("peak_bytes_in_use"),
                predicted=probe["predicted"]["total"], predicted_temp=probe["predicted"]["temp"],
                step_device_peak=None if after_step is None else after_step.get("peak_bytes_in_use"),
                step_host_peak=probe["step_peak"]))
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Device check: {report['device']}", "",
             f"jax {report['jax']}, backend {report['backend']}, bf16 dense peak "
             f"{_fmt(report['bf16_peak_tflops'], '.0f')} TFLOP/s{' (dry run: tiny shapes, interpret mode)' if report['dry_run'] else ''}",
             "", "## Joint attention kernel (bf16; TFLOP/s over unmasked work)", "",
             "| case | implementation | pass | ms | TFLOP/s | of peak | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in report["kernel"]:
        lines.append(f"| {r['case']} | {r['impl']} | {r['pass_']} | {_fmt(r['ms'], '.2f')} | "
                     f"{_fmt(r['tflops'], '.1f')} | {_fmt(r['of_peak'], '.0%')} | {r['note']} |")
    s = report["stack"]
    lines += ["", "## Nano-width denoising step (bf16, cached reasoner, 2 guidance rows)", "",
              "| layers | generator tokens | step (ms) | extrapolated 720p t2v (s) | "
              + " | ".join(f"vs {k} ({v:.0f} s)" for k, v in PUBLISHED_H100_SECONDS.items()) + " |",
              "|---:|---:|---:|---:|" + "---:|" * len(PUBLISHED_H100_SECONDS),
              f"| {s['layers']} of {NANO_LAYERS} | {s['generator_tokens']} | {s['step_ms']:.1f} | "
              f"{s['extrapolated_720p_seconds']:.1f} | "
              + " | ".join(f"{s['versus_published'][k]:.2f}x" for k in PUBLISHED_H100_SECONDS) + " |",
              "", s["note"], "", "## Parity", "", "| check | max error | tolerance | holds |", "|---|---:|---:|---|"]
    for r in report["parity"]:
        err = r.get("max_abs_err", r.get("max_rel_err"))
        lines.append(f"| {r['check']} | {err:.2e} | {r['tolerance']:.0e} | {'yes' if r['holds'] else 'NO'} |")
    m = report["memory_shape"]
    lines += ["", f"## Memory (synthetic transformer: {m['layers']} layers, hidden 512, intermediate "
              f"{m['intermediate']}; one joint forward, bf16, batch 1, {m['text']} text tokens, latent "
              f"{'x'.join(map(str, m['latent']))}; MiB)", "",
              "| weights | tree held | load: host peak | load: device peak | step: XLA predicted (temp) | "
              "step: device peak | step: host peak |", "|---|---:|---:|---:|---:|---:|---:|"]
    mib = lambda b: _fmt(None if b is None else b / 2**20, ",.1f")  # noqa: E731
    for r in report["memory"]:
        lines.append(f"| {r['weights']} | {mib(r['held'])} | {mib(r['load_host_peak'])} | "
                     f"{mib(r['load_device_peak'])} | {mib(r['predicted'])} ({mib(r['predicted_temp'])}) | "
                     f"{mib(r['step_device_peak'])} | {mib(r['step_host_peak'])} |")
    lines += ["", "Device peaks are `memory_stats()['peak_bytes_in_use']` of the probe's process (— where the "
              "backend keeps none, as XLA:CPU); host peaks are RSS above the RSS before the load or the step."]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, Pallas interpreted, on CPU")
    parser.add_argument("--out", default="device_check", help="output folder (default: device_check/)")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    if not args.dry_run and backend not in ("gpu", "cuda", "rocm"):
        print(f"error: no GPU found (jax backend is {backend!r}); use --dry-run to check the script on CPU",
              file=sys.stderr)
        return 2
    sizes = dry_sizes() if args.dry_run else full_sizes()
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", str(device))
    peak = None if args.dry_run else _peak(kind)
    start = time.perf_counter()
    report: dict[str, Any] = dict(device=kind, backend=backend, jax=jax.__version__, dry_run=args.dry_run,
                                  bf16_peak_tflops=peak)
    sections = {}
    for name, run in (("kernel", lambda: kernel_rows(sizes, args.dry_run, peak)), ("stack", lambda: stack_row(sizes)),
                      ("parity", lambda: parity_rows(sizes)), ("pipeline", lambda: pipeline_row(args.dry_run)),
                      ("memory", lambda: memory_rows(sizes))):
        section_start = time.perf_counter()
        report[name] = run()
        sections[name] = round(time.perf_counter() - section_start, 1)
        print(f"{name}: {sections[name]} s", flush=True)
    report["parity"].append(report.pop("pipeline"))
    report["memory_shape"] = dict(layers=sizes.memory_layers, intermediate=sizes.memory_intermediate,
                                  text=sizes.memory_text, latent=list(sizes.memory_latent))
    report["section_seconds"] = sections
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "device_check.json", json.dumps(report, indent=2) + "\n")
    _write(out / "device_check.md", markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'} ({report['seconds']:.0f} s)")
    failed = [r["check"] for r in report["parity"] if not r["holds"]]
    if failed:
        print(f"error: parity does not hold: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

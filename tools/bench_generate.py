"""Generation: jitted JAX `Cosmos3Pipeline` vs diffusers `Cosmos3OmniPipeline`, same tiny random pipeline, same noise.

    python tools/bench_generate.py [--steps 8] [--frames 17] [--size 128] [--prompt-words 300] [--repeats 3]

A tiny random reference pipeline (2-layer transformer, hidden 64; tiny Wan VAE; the converter's UniPC config;
the tiny tokenizer) is saved with `save_pretrained`; the JAX pipeline loads the saved folder with
`Cosmos3Pipeline.from_pretrained` (fp32, `--attention`, default the plain XLA attention). Both start from the
reference's `prepare_latents`.
Two cases:
  - text2video with guidance 6 (two branches per step);
  - policy with a long prompt and a short clip (chunk 4), guidance 1, where the reasoner dominates a step: JAX
    with the reasoner K/V cache (default), JAX re-running the reasoner every step (`cache_reasoner=False`, as
    the reference does) and diffusers.
Per step: JAX = denoise seconds of a warm call / steps (the loop is one executable); diffusers = median gap
between `callback_on_step_end` calls. End to end: wall seconds of a warm call with output_type="latent".
Compile: the JAX executable's AOT compile seconds (first call only). The reference's end to end includes its
VAE encode of the (all-zero or first-frame) conditioning video, which it runs even for text→video; the JAX
pipeline skips it (text→video) or, here, is handed the same starting latents. Prints one markdown table.

    python tools/bench_generate.py --batch-sweep [--sizes 1 2 4 8] [--repeats 3]

runs only the batch sweep instead: B samples of one text2video request (guidance 6, so 2B rows) in one
`Cosmos3Pipeline.run_batch`, timed warm (denoise seconds, median of `--tiny-repeats` or `--repeats`): samples/s and seconds per
sample, on the tiny pipeline above and on a compute-bound config (4 layers, hidden 512, 8/4 heads x 64; 17
frames at 256x256 = 320 generator tokens per row; random JAX weights, no VAE, latents out), where GFLOP/s
(dense matmul + unmasked attention FLOPs of every step and the reasoner pass) and the fraction of this machine's
fp32 matmul ceiling (an XLA 2048^3 matmul, measured in the same run) are reported too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipeline, CosmosActionCondition
from PIL import Image
from transformers import AutoTokenizer

from cosmos_jax.config import Cosmos3Config, load_preset
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.modeling.wan_vae import COSMOS3_LATENTS_MEAN, COSMOS3_LATENTS_STD
from cosmos_jax.sampling.batch import Sample
from cosmos_jax.sampling.prompts import ChatTokenizer
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.scheduler_config import SchedulerConfig
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from bench_forward import matmul_ceiling, model_flops  # noqa: E402
from torch_reference import NANO_STYLE, build_torch_transformer  # noqa: E402

TRANSFORMER = dict(NANO_STYLE, vocab_size=600, action_dim=16, sound_dim=64)
VAE = dict(
    base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
    in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=list(COSMOS3_LATENTS_MEAN), latents_std=list(COSMOS3_LATENTS_STD),
)
PROMPT = "A robot arm picks up a red cube from the wooden table and places it in a blue bowl"
FILLER = ("The scene is lit by soft daylight from a window on the left while the camera stays still "
          "and the arm moves slowly and carefully across the table ")


def build_folder(root: str) -> str:
    tok = os.path.join(root, "tok")
    write_tiny_tokenizer(tok)
    torch.manual_seed(0)
    pipe = Cosmos3OmniPipeline(
        transformer=build_torch_transformer(TRANSFORMER, seed=2),
        text_tokenizer=AutoTokenizer.from_pretrained(tok),
        vae=AutoencoderKLWan(**VAE).eval(),
        scheduler=UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
                                          prediction_type="flow_prediction", sigma_max=200.0, sigma_min=0.147),
        enable_safety_checker=False,
    )
    folder = os.path.join(root, "pipeline")
    pipe.save_pretrained(folder)
    return folder


def reference_start(reference: Any, request: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        out = reference.prepare_latents(
            image=None, video=None, num_frames=request["num_frames"], height=request.get("height"),
            width=request.get("width"), fps=24.0, generator=torch.Generator().manual_seed(0), device="cpu",
            dtype=torch.float32, action=request.get("action"),
        )
    return out[0], out[2]


def time_reference(reference: Any, request: dict[str, Any], steps: int, repeats: int) -> tuple[float, float, Any]:
    """(median seconds per step, median end-to-end seconds, final latents) of warm diffusers calls."""
    vision, action = reference_start(reference, request)
    per_step, total, final = [], [], None
    for _ in range(repeats + 1):
        stamps: list[float] = []

        def on_step(pipe, i, t, tensors):
            stamps.append(time.perf_counter())
            return {}

        start = time.perf_counter()
        out = reference(
            request["prompt"], action=request.get("action"), num_frames=request.get("call_frames"),
            height=request.get("height"), width=request.get("width"), num_inference_steps=steps,
            guidance_scale=request["guidance"], latents=vision, action_latents=action, output_type="latent",
            callback_on_step_end=on_step, enable_safety_check=False,
        )
        total.append(time.perf_counter() - start)
        per_step.append(statistics.median(np.diff(stamps)))
        final = out.video
    return statistics.median(per_step[1:]), statistics.median(total[1:]), final.numpy()


def time_jax(pipeline: Cosmos3Pipeline, request: dict[str, Any], start: Any, steps: int,
             repeats: int) -> tuple[float, float, float, np.ndarray]:
    """(compile seconds, seconds per step, end-to-end seconds, final latents) of the jitted pipeline."""
    vision, action = start
    call = GenerationRequest(request["prompt"], **request["jax"], steps=steps, guidance=request["guidance"],
                             init_noise=vision.numpy(), init_action_noise=None if action is None else action.numpy(),
                             output_type="latent")
    first = pipeline(call, progress=False)
    per_step, total = [], []
    for _ in range(repeats):
        start_time = time.perf_counter()
        result = pipeline(call, progress=False)
        total.append(time.perf_counter() - start_time)
        per_step.append(result.timings["denoise"] / steps)
    return first.timings["compile"], statistics.median(per_step), statistics.median(total), result.latents


COMPUTE_BOUND = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=64, rope_axes_dim=[12, 10, 10])


def compute_bound_pipeline(root: str, attention: str) -> Cosmos3Pipeline:
    """A pipeline around a wider random transformer (COMPUTE_BOUND over the tiny preset), no VAE."""
    cfg = Cosmos3Config.from_dict({**load_preset("tiny").to_dict(), **COMPUTE_BOUND})
    model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention=attention)
    params = jax.jit(model.init)(jax.random.key(0))
    tok = os.path.join(root, "tok_compute")
    write_tiny_tokenizer(tok)
    return Cosmos3Pipeline(model, params, ChatTokenizer.from_dir(tok), SchedulerConfig.cosmos3())


def sweep(pipeline: Cosmos3Pipeline, request: GenerationRequest, sizes: list[int],
          repeats: int) -> list[tuple[int, float, float]]:
    """[(B, compile seconds, median warm denoise seconds)] for B samples of `request` in one batch."""
    out = []
    for size in sizes:
        samples = [Sample(request, k) for k in range(size)]
        first = pipeline.run_batch(samples, progress=False)
        times = [pipeline.run_batch(samples, progress=False)[0].timings["denoise"] for _ in range(repeats)]
        out.append((size, first[0].timings["compile"], statistics.median(times)))
    return out


def batch_sweep(args: argparse.Namespace, root: str) -> None:
    """Print the batch-sweep tables (tiny pipeline, compute-bound config)."""
    frames, size = args.frames, args.size
    tiny = Cosmos3Pipeline.from_pretrained(build_folder(root), dtype=jnp.float32, attention=args.attention)
    tiny_request = GenerationRequest(PROMPT, num_frames=frames, height=size, width=size, steps=args.steps,
                                     guidance=6.0, output_type="latent")
    wide = compute_bound_pipeline(root, args.attention)
    wide_request = GenerationRequest(PROMPT, num_frames=17, height=256, width=256, steps=2, guidance=6.0,
                                     output_type="latent")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"({jax.default_backend()}); attention {args.attention}; fp32; text2video guidance 6 (2 rows per "
          f"sample); median of {args.tiny_repeats} (tiny) / {args.repeats} (compute-bound) warm runs\n")
    cases = (("tiny pipeline", tiny, tiny_request, args.tiny_repeats),
             ("compute-bound config", wide, wide_request, args.repeats))
    for name, pipe, request, repeats in cases:
        prep = pipe.prepare(request)
        text_len = max(len(prep.cond_ids), len(prep.uncond_ids))
        t, h, w = prep.latent_shape
        patch = pipe.config.latent_patch_size
        gen_len = t * (h // patch) * (w // patch)
        total, reasoner = model_flops(pipe.config, text_len, gen_len)
        per_sample = 2 * (request.steps * (total - reasoner) + reasoner)  # 2 guidance rows, reasoner once
        compute_bound = pipe is wide
        ceilings = [matmul_ceiling()] if compute_bound else []
        results = sweep(pipe, request, args.sizes, repeats)
        ceiling = max(ceilings + [matmul_ceiling()]) if compute_bound else None
        base = results[0][2] / results[0][0]
        print(f"{name}: {pipe.config.num_hidden_layers} layers, hidden {pipe.config.hidden_size}, "
              f"{text_len} text + {gen_len} generator tokens per row, {request.steps} steps"
              + (f"; fp32 matmul ceiling (XLA 2048^3, best of before/after) {ceiling:.0f} GFLOP/s" if ceiling
                 else "") + "\n")
        print("| B | compile s | denoise s | samples/s | s / sample | vs B=1 | GFLOP/s | of ceiling |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for b, compile_s, seconds in results:
            gflops = b * per_sample / seconds / 1e9
            flops = f"{gflops:.1f} | {gflops / ceiling:.0%}" if ceiling else "– | –"
            print(f"| {b} | {compile_s:.1f} | {seconds:.3f} | {b / seconds:.2f} | {seconds / b:.3f} | "
                  f"{base / (seconds / b):.2f}x | {flops} |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17, help="text2video frames (1+4k)")
    parser.add_argument("--size", type=int, default=128, help="text2video height = width (multiple of 16)")
    parser.add_argument("--prompt-words", type=int, default=300, help="words in the long policy prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="xla", help="JAX attention implementation (xla, blocked, auto)")
    parser.add_argument("--batch-sweep", action="store_true",
                        help="run only the batch sweep (samples/s for B samples per batch)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes of the sweep")
    parser.add_argument("--tiny-repeats", type=int, default=9,
                        help="warm runs per batch size on the tiny pipeline (its calls last milliseconds)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own); 1 is faster on a busy 2-core host")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    if args.batch_sweep:
        with tempfile.TemporaryDirectory() as root:
            batch_sweep(args, root)
        return
    with tempfile.TemporaryDirectory() as root:
        folder = build_folder(root)
        reference = Cosmos3OmniPipeline.from_pretrained(folder, enable_safety_checker=False)
        reference.set_progress_bar_config(disable=True)
        cached = Cosmos3Pipeline.from_pretrained(folder, dtype=jnp.float32, attention=args.attention)
        uncached = Cosmos3Pipeline(cached.model, cached.params, cached.tokenizer, cached.scheduler_config,
                                   vae=cached.vae, vae_params=cached.vae_params, cache_reasoner=False)

        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        long_prompt = " ".join((PROMPT + " " + FILLER * (args.prompt_words // 20 + 1)).split()[: args.prompt_words])
        requests = {
            f"text2video {args.frames}x{args.size}x{args.size}, guidance 6": dict(
                prompt=PROMPT, num_frames=args.frames, call_frames=args.frames, height=args.size, width=args.size,
                guidance=6.0, jax=dict(num_frames=args.frames, height=args.size, width=args.size)),
            f"policy, {args.prompt_words}-word prompt, chunk 4, guidance 1": dict(
                prompt=long_prompt, num_frames=5, guidance=1.0,
                action=CosmosActionCondition(mode="policy", chunk_size=4, domain_name="av", resolution_tier=256,
                                             image=image),
                jax=dict(action_mode="policy", domain="av", chunk=4, resolution_tier=256, image=image)),
        }
        rows = []
        for name, request in requests.items():
            start = reference_start(reference, request)
            tokens = len(cached.prepare(GenerationRequest(request["prompt"], **request["jax"],
                                                          guidance=request["guidance"])).cond_ids)
            ref_step, ref_total, ref_latents = time_reference(reference, request, args.steps, args.repeats)
            variants = [("JAX (reasoner K/V cached)", cached)]
            if "policy" in name:
                variants.append(("JAX (reasoner every step)", uncached))
            for label, pipe in variants:
                compile_s, step_s, total_s, latents = time_jax(pipe, request, start, args.steps, args.repeats)
                diff = float(np.abs(latents - ref_latents).max())
                rows.append((name, tokens, label, f"{compile_s:.1f}", f"{step_s * 1e3:.2f}", f"{total_s:.3f}",
                             f"{ref_step / step_s:.1f}x", f"{diff:.1e}"))
            rows.append((name, tokens, "diffusers (torch)", "-", f"{ref_step * 1e3:.2f}", f"{ref_total:.3f}",
                         "1.0x", "-"))

    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"JAX attention {args.attention}; {args.steps} steps, fp32, median of {args.repeats} warm runs\n")
    print("| case | prompt tokens | implementation | compile s | ms / step | end to end s | step speed-up | "
          "max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()

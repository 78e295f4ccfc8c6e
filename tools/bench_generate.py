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

from cosmos_jax.modeling.wan_vae import COSMOS3_LATENTS_MEAN, COSMOS3_LATENTS_STD
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17, help="text2video frames (1+4k)")
    parser.add_argument("--size", type=int, default=128, help="text2video height = width (multiple of 16)")
    parser.add_argument("--prompt-words", type=int, default=300, help="words in the long policy prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="xla", help="JAX attention implementation (xla, blocked, auto)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own); 1 is faster on a busy 2-core host")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

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
            tokens = len(cached.plan(GenerationRequest(request["prompt"], **request["jax"],
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

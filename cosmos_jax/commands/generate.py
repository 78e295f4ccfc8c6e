"""`cosmos-jax generate`: text/image/video/actions in; video (+ sound), actions or latents out."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cosmos_jax.sampling.prompts import ACTION_MODES, EMBODIMENT_DOMAINS, VIEWPOINT_SENTENCES

_DTYPES = ("bfloat16", "float32")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (Hub layout as published, or converted)")
    parser.add_argument("--prompt", required=True, help="what to generate (the task description in action modes)")
    parser.add_argument("--negative-prompt", default=None, help="the guidance branch's prompt (default empty)")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", default=None, help="conditioning image: image→video, or the action first frame")
    media.add_argument("--video", default=None, help="conditioning video: video→video, or inverse dynamics")
    parser.add_argument("--condition-frames", type=int, nargs="+", default=[0, 1],
                        help="video→video: clean latent frames taken from --video (default 0 1 = 5 pixel frames)")
    parser.add_argument("--action-mode", choices=ACTION_MODES, default=None)
    parser.add_argument("--domain", default=None, help=f"embodiment: one of {', '.join(sorted(EMBODIMENT_DOMAINS))}")
    parser.add_argument("--actions", default=None, help="forward_dynamics: actions [T, raw width] as .npy")
    parser.add_argument("--action-stats", default=None,
                        help="action_stats.json (from `prepare lerobot`, copied into a training run): --actions "
                             "are read and generated actions written in raw units (default: MODEL/"
                             "action_stats.json when present, else model space)")
    parser.add_argument("--chunk", type=int, default=16, help="action chunk (the clip has chunk+1 frames)")
    parser.add_argument("--resolution-tier", type=int, default=480, choices=(256, 480, 704, 720),
                        help="action modes: canvas tier for the conditioning frames")
    parser.add_argument("--view-point", default="ego_view", choices=sorted(VIEWPOINT_SENTENCES))
    parser.add_argument("--num-frames", type=int, default=None, help="1 (an image) or 1+4k; default 189")
    parser.add_argument("--height", type=int, default=None, help="multiple of 16; default 720")
    parser.add_argument("--width", type=int, default=None, help="multiple of 16; default 1280")
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance (>= 1; 1 = off). Default 6 for video, 1 in action modes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sound", action="store_true", help="generate sound with the video (models with sound)")
    parser.add_argument("--init-noise", default=None, help="starting vision latents [1,48,T,H,W] .npy, used as is")
    parser.add_argument("--init-sound-noise", default=None, help="starting sound latents [64,Ts] .npy")
    parser.add_argument("--init-action-noise", default=None, help="starting action latents [chunk,A] .npy")
    parser.add_argument("--output-type", choices=("video", "latent"), default="video")
    parser.add_argument("--output", required=True,
                        help="output path: .mp4 (video), .png (one frame) or .npy (latents); side files "
                             "(.wav, .actions.npy/.json/.png) are named after it")
    parser.add_argument("--dtype", choices=_DTYPES, default="bfloat16")
    parser.add_argument("--quantize", default=None, metavar="MODE",
                        help="weight-only quantization of the transformer's layer linears: int8 or fp8 "
                             "(per output channel; norms, embeddings, time embedder and heads stay full precision)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA folder from `cosmos-jax train --lora-rank` (repeat for several; SCALE "
                             "multiplies its update, default 1)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold the --lora updates into the weights once (default: applied per layer each step)")
    parser.add_argument("--offload-reasoner", action="store_true",
                        help="keep the towers in host memory between uses: the reasoner comes to the device for the "
                             "prompt's K/V, then the generator for the denoising loop (less device memory, same "
                             "outputs)")
    parser.add_argument("--attention", default="auto", help="attention implementation: auto, xla, blocked, pallas")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_paths(args: argparse.Namespace) -> None:
    """Every input file exists, the output suffix fits the request and --quantize is known (before loading
    anything)."""
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
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"model folder not found: {args.model}")
    for flag in ("image", "video", "actions", "action_stats", "init_noise", "init_sound_noise", "init_action_noise"):
        value = getattr(args, flag)
        if value is not None and not os.path.isfile(value):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} file not found: {value}")
    suffix = os.path.splitext(args.output)[1].lower()
    allowed = (".npy",) if args.output_type == "latent" else (".mp4", ".png")
    if suffix not in allowed:
        raise ValueError(f"--output {args.output!r}: with --output-type {args.output_type} use a "
                         f"{' or '.join(allowed)} path")
    if args.output_type == "video" and args.action_mode is None:
        single = args.num_frames == 1
        if single != (suffix == ".png"):
            raise ValueError(f"--output {args.output!r}: one frame is written as .png, a video as .mp4")


def generate_and_write(pipeline: Any, args: argparse.Namespace) -> list[str]:
    """Run the pipeline for parsed arguments and write every output; returns the written paths."""
    import numpy as np

    from cosmos_jax.datasets.normalization import STATS_FILE, normalizer_for_domain
    from cosmos_jax.sampling import media
    from cosmos_jax.sampling.request import GenerationRequest

    if args.action_stats and (args.action_mode is None or args.domain is None):
        raise ValueError("--action-stats applies to action modes: give --action-mode and --domain")
    stats = args.action_stats or os.path.join(args.model, STATS_FILE)
    normalizer = None
    if args.action_mode is not None and args.domain is not None and (args.action_stats or os.path.isfile(stats)):
        normalizer = normalizer_for_domain(stats, args.domain)
    actions = np.load(args.actions) if args.actions is not None else None
    if actions is not None and normalizer is not None:
        actions = normalizer.to_model(actions).astype(np.float32)
    guidance = args.guidance if args.guidance is not None else (1.0 if args.action_mode else 6.0)
    request = GenerationRequest(
        args.prompt, args.negative_prompt, image=args.image, video=args.video, action_mode=args.action_mode,
        domain=args.domain, actions=actions, chunk=args.chunk, resolution_tier=args.resolution_tier,
        view_point=args.view_point, condition_frames=tuple(args.condition_frames), num_frames=args.num_frames,
        height=args.height, width=args.width, fps=args.fps, steps=args.steps, guidance=guidance, seed=args.seed,
        enable_sound=args.sound, init_noise=args.init_noise, init_sound_noise=args.init_sound_noise,
        init_action_noise=args.init_action_noise, output_type=args.output_type,
    )
    result = pipeline(request, progress=not args.no_progress)
    stem = media.output_stem(args.output)
    written: list[str] = []
    if args.output_type == "latent":
        media.write_npy(args.output, result.latents)
        written.append(args.output)
        if result.sound_latents is not None:
            written.append(f"{stem}.sound_latents.npy")
            media.write_npy(written[-1], result.sound_latents)
    else:
        written += media.write_video_outputs(stem, result.video, result.fps, result.sound, result.sample_rate)
    if result.actions is not None:
        written += media.write_actions(stem, result.actions, domain=args.domain, mode=result.mode,
                                       normalizer=normalizer)
    t = result.timings
    print(f"{result.mode}: compile {t['compile']:.1f}s, denoise {t['denoise']:.2f}s, decode {t['decode']:.1f}s",
          file=sys.stderr)
    return written


def _read_loras(args: argparse.Namespace) -> list[Any]:
    """(adapter, scale, flag value) for every --lora, read and checked before the model loads."""
    from cosmos_jax.training.lora import load_adapters, parse_lora_arg

    specs = []
    for value in args.lora:
        path, scale = parse_lora_arg(value)
        specs.append((load_adapters(path), scale, value))
    return specs


def run(args: argparse.Namespace) -> int:
    try:
        _check_paths(args)
        loras = _read_loras(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from cosmos_jax.compile_cache import enable as enable_compile_cache

    enable_compile_cache()
    import jax.numpy as jnp

    from cosmos_jax.sampling.generate import Cosmos3Pipeline

    try:
        pipeline = Cosmos3Pipeline.from_pretrained(args.model, dtype=getattr(jnp, args.dtype),
                                                   attention=args.attention, quantize=args.quantize,
                                                   offload_reasoner=args.offload_reasoner)
        if loras:
            from cosmos_jax.training.lora import apply_adapters

            pipeline.params = apply_adapters(pipeline.params, loras, args.merge_lora)
        written = generate_and_write(pipeline, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0

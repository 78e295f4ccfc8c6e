"""`cosmos-jax generate`: text/image/video/actions in; video (+ sound), actions or latents out.

With `--num-samples N` > 1 the outputs are STEM-00000.mp4 ... STEM-{N-1:05d}.mp4 (side files named the same way)
and STEM.samples.json listing every output with its seed and sample index; sample k draws its noise from
fold_in(key(--seed), k). The samples run in batches of `--batch-size`, sharded over `--mesh data=D`, and each is
written as soon as its batch finishes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from cosmos_jax.commands import errors
from cosmos_jax.commands.model_options import add_model_arguments, check_model_arguments, load_pipeline
from cosmos_jax.sampling.prompts import ACTION_MODES, EMBODIMENT_DOMAINS, VIEWPOINT_SENTENCES

_DTYPES = ("bfloat16", "float32")
_TEMPORAL = 4
EPILOG = """\
examples: one per mode, on the demo checkpoint `cosmos-jax demo` builds (64x64, 4 steps: seconds on a CPU).
Run them in order in one folder: the later ones read what the earlier ones wrote.
  M=~/.cache/cosmos-jax/demo/checkpoint
  # text -> image
  cosmos-jax generate --model $M --prompt "A red cube on a wooden table." --num-frames 1 --height 64 --width 64 --steps 4 --output frame.png
  # text -> video
  cosmos-jax generate --model $M --prompt "A robot arm picks up a red cube." --num-frames 9 --height 64 --width 64 --steps 4 --output t2v.mp4
  # text -> video with sound (t2v_sound.mp4 and t2v_sound.wav)
  cosmos-jax generate --model $M --prompt "A cube falls onto a table." --num-frames 9 --height 64 --width 64 --steps 4 --sound --output t2v_sound.mp4
  # image -> video
  cosmos-jax generate --model $M --prompt "The cube slides to the left." --image frame.png --num-frames 9 --height 64 --width 64 --steps 4 --output i2v.mp4
  # video -> video (latent frame 0 = pixel frame 0 kept; a frames folder or a .npy [T, H, W, 3] works too)
  cosmos-jax generate --model $M --prompt "The arm keeps moving." --video t2v.mp4 --condition-frames 0 --num-frames 9 --height 64 --width 64 --steps 4 --output v2v.mp4
  # policy: first frame in, video and actions out (policy.mp4, policy.actions.npy/.json/.png)
  cosmos-jax generate --model $M --prompt "Pick up the cube." --action-mode policy --domain bridge_orig_lerobot --image frame.png --chunk 8 --resolution-tier 256 --steps 4 --output policy.mp4
  # forward dynamics: first frame and actions in, video out
  cosmos-jax generate --model $M --prompt "Pick up the cube." --action-mode forward_dynamics --domain bridge_orig_lerobot --image frame.png --actions policy.actions.npy --chunk 8 --resolution-tier 256 --steps 4 --output forward.mp4
  # inverse dynamics: video in, actions out (inverse.actions.npy/.json/.png)
  cosmos-jax generate --model $M --prompt "Pick up the cube." --action-mode inverse_dynamics --domain bridge_orig_lerobot --video t2v.mp4 --chunk 8 --resolution-tier 256 --steps 4 --output inverse.mp4

Without size flags a video is 189 frames of 720x1280 at 35 steps: hours on a CPU. The work is estimated and
printed before compiling; sizes whose buffers cannot fit in memory are refused with a size that would."""


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--model", required=True, help="model folder (Hub layout as published, or converted)")
    parser.add_argument("--prompt", required=True, help="what to generate (the task description in action modes)")
    parser.add_argument("--negative-prompt", default=None, help="the guidance branch's prompt (default empty)")
    media = parser.add_mutually_exclusive_group()
    media.add_argument("--image", default=None, help="conditioning image: image→video, or the action first frame")
    media.add_argument("--video", default=None,
                       help="conditioning clip for video→video or the action modes: a video file, a folder of "
                            "PNG/JPEG frames, or a .npy [T, H, W, 3] (uint8, or float in [0, 1])")
    parser.add_argument("--condition-frames", type=int, nargs="+", default=None,
                        help="video→video: clean latent frames taken from --video (default 0 1 = 5 pixel frames)")
    parser.add_argument("--action-mode", choices=ACTION_MODES, default=None,
                        help="generate robot actions: policy (first frame -> video + actions), forward_dynamics "
                             "(first frame + --actions -> video), inverse_dynamics (--video -> actions)")
    parser.add_argument("--domain", default=None, help=f"embodiment: one of {', '.join(sorted(EMBODIMENT_DOMAINS))}")
    parser.add_argument("--actions", default=None, help="forward_dynamics: actions [T, raw width] as .npy (floats)")
    parser.add_argument("--action-stats", default=None,
                        help="action_stats.json (from `prepare lerobot`, copied into a training run): --actions "
                             "are read and generated actions written in raw units (default: MODEL/"
                             "action_stats.json when present, else model space)")
    parser.add_argument("--chunk", type=int, default=16,
                        help="action modes: actions per clip, a multiple of 4 (the clip has chunk+1 frames)")
    parser.add_argument("--resolution-tier", type=int, default=480, choices=(256, 480, 704, 720),
                        help="action modes: canvas tier for the conditioning frames")
    parser.add_argument("--view-point", default="ego_view", choices=sorted(VIEWPOINT_SENTENCES),
                        help="action modes: the camera sentence in the prompt")
    parser.add_argument("--num-frames", type=int, default=None, help="1 (an image) or 1+4k (default 189)")
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default 720)")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default 1280)")
    parser.add_argument("--fps", type=float, default=24.0, help="frame rate of the output (also told to the model)")
    parser.add_argument("--steps", type=int, default=35, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance (>= 1; 1 = off). Default 6 for video, 1 in action modes")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--sound", action="store_true", help="generate sound with the video (models with sound)")
    parser.add_argument("--init-noise", default=None, help="starting vision latents [1,48,T,H,W] .npy, used as is")
    parser.add_argument("--init-sound-noise", default=None, help="starting sound latents [64,Ts] .npy")
    parser.add_argument("--init-action-noise", default=None, help="starting action latents [chunk,A] .npy")
    parser.add_argument("--output-type", choices=("video", "latent"), default="video",
                        help="video: decoded frames (.mp4/.png); latent: the final latents (.npy)")
    parser.add_argument("--output", required=True,
                        help="output path: .mp4 (video), .png (one frame) or .npy (latents); side files "
                             "(.wav, .actions.npy/.json/.png) are named after it")
    parser.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="weight and compute dtype")
    add_model_arguments(parser)
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "blocked", "pallas"),
                        help="attention implementation (auto: Pallas on GPU/TPU, blocked on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--warm-only", action="store_true",
                        help="compile every program this command line would run into the compile cache "
                             "(COSMOS_JAX_COMPILE_CACHE) and stop: nothing runs, nothing is written. Needs "
                             "--no-progress, here and in the run it warms (JAX never caches the loop that drives "
                             "the step bar: it has a host callback)")
    batch = parser.add_argument_group("batches and devices")
    batch.add_argument("--num-samples", type=int, default=1,
                       help="samples of the request (sample k uses the noise key fold_in(key(seed), k)); above 1 "
                            "the outputs are STEM-00000.EXT, ... and STEM.samples.json")
    batch.add_argument("--batch-size", type=int, default=None,
                       help="samples per jitted loop, a multiple of the mesh's data axis (default: its size, 1 "
                            "without a mesh); host memory holds one batch")
    batch.add_argument("--mesh", default=None, metavar="data=D[,fsdp=F,tensor=T,context=C]",
                       help="device mesh over all devices; the batch is sharded over data, the weights as the "
                            "rules say (default: one device)")
    batch.add_argument("--mesh-rules", default="nano", help="mesh preset whose rules shard weights and batch")
    batch.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first (multi-host: every process writes the "
                            "samples its devices hold; process 0 writes STEM.samples.json)")


def _check_args(args: argparse.Namespace) -> None:
    """Every flag and path that needs no model, and the output location (before loading anything)."""
    errors.input_path(args.model, "--model", folder=True)
    errors.input_path(args.image, "--image")
    errors.input_path(args.video, "--video", folder=None)
    for flag in ("actions", "action_stats", "init_noise", "init_sound_noise", "init_action_noise"):
        errors.input_path(getattr(args, flag), f"--{flag.replace('_', '-')}")
    errors.finite(args.fps, "--fps", low=0, low_open=True)
    errors.finite(args.guidance, "--guidance", low=1)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.condition_frames is not None and args.video is None:
        raise ValueError("--condition-frames selects frames of --video; give --video too (or leave it out)")
    if args.actions is not None and args.action_mode != "forward_dynamics":
        raise ValueError("--actions is only read with --action-mode forward_dynamics")
    if args.action_mode is not None and (args.chunk < 1 or args.chunk % _TEMPORAL):
        raise ValueError(f"--chunk must be a positive multiple of 4, got {args.chunk}")
    suffix = os.path.splitext(args.output)[1].lower()
    allowed = (".npy",) if args.output_type == "latent" else (".mp4", ".png")
    if suffix not in allowed:
        raise ValueError(f"--output {args.output!r}: with --output-type {args.output_type} use a "
                         f"{' or '.join(allowed)} path")
    if args.output_type == "video" and args.action_mode is None:
        single = args.num_frames == 1
        if single != (suffix == ".png"):
            raise ValueError(f"--output {args.output!r}: one frame is written as .png, a video as .mp4")
    errors.output_path(args.output, "--output")
    if args.warm_only and not args.no_progress:
        raise ValueError("--warm-only needs --no-progress (and so does the run it warms): the step progress bar "
                         "is a host callback in the denoising loop, and JAX never writes such a program to the "
                         "compile cache")
    if args.warm_only and args.distributed:
        raise ValueError("--warm-only runs in one process (JAX writes the compile cache from process 0 only): "
                         "drop --distributed")


def _check_counts(args: argparse.Namespace) -> None:
    """--num-samples / --batch-size / --mesh make sense together (before loading anything)."""
    from cosmos_jax.sampling.batch import check_batch_size
    from cosmos_jax.sharding import parse_mesh_spec

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be a positive integer, got {args.num_samples}")
    data = parse_mesh_spec(args.mesh)["data"] if args.mesh is not None else 1
    if args.batch_size is not None:
        try:
            check_batch_size(args.batch_size, data)
        except ValueError as e:
            raise ValueError(f"--batch-size: {e}") from None
    if args.num_samples > 1:
        given = [f"--{f.replace('_', '-')}" for f in ("init_noise", "init_sound_noise", "init_action_noise")
                 if getattr(args, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} fix the starting latents, so every sample would be the same: "
                             "use --num-samples 1")


# The pipeline's messages use parameter names; the command line says the flags. Longest names first.
_FLAG_NAMES = [(re.compile(rf"(?<![\w-]){name}(?![\w])"), flag) for name, flag in (
    ("num_frames/height/width", "--num-frames/--height/--width"), ("height and width", "--height and --width"),
    ("init_sound_noise", "--init-sound-noise"), ("init_action_noise", "--init-action-noise"),
    ("init_noise", "--init-noise"), ("condition_frames", "--condition-frames"), ("action_mode", "--action-mode"),
    ("view_point", "--view-point"), ("resolution_tier", "--resolution-tier"), ("enable_sound", "--sound"),
    ("output_type", "--output-type"), ("num_frames", "--num-frames"), ("needs a domain", "needs a --domain"),
    ("domain and actions", "--domain and --actions"), ("chunk must", "--chunk must"),
    ("forward_dynamics needs actions", "forward_dynamics needs --actions"),
    ("actions must", "--actions must"), ("actions have", "--actions have"), ("actions contain", "--actions contain"),
    ("actions are only", "--actions is only"),
)]


def flag_names(message: str) -> str:
    """A pipeline error message with parameter names replaced by the flags that set them."""
    for pattern, flag in _FLAG_NAMES:
        message = pattern.sub(flag, message)
    return message


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's image/video/actions/init-noise arguments read from the flags' files (actions mapped to model
    space when there are action stats; "normalizer" maps generated ones back), warning where the request will
    change them (cut, padded or partly unused)."""
    from cosmos_jax.datasets.normalization import STATS_FILE, normalizer_for_domain
    from cosmos_jax.sampling import media_input

    if args.action_stats and (args.action_mode is None or args.domain is None):
        raise ValueError("--action-stats applies to action modes: give --action-mode and --domain")
    inputs: dict[str, Any] = {"image": None, "video": None, "actions": None, "normalizer": None}
    stats = args.action_stats or os.path.join(args.model, STATS_FILE)
    if args.action_mode is not None and args.domain is not None and (args.action_stats or os.path.isfile(stats)):
        inputs["normalizer"] = normalizer_for_domain(stats, args.domain)
    if args.image is not None:
        inputs["image"] = media_input.read_image(args.image, "--image")
    if args.video is not None:
        inputs["video"] = media_input.read_clip(args.video, "--video").frames
    for flag in ("actions", "init_noise", "init_sound_noise", "init_action_noise"):
        path = getattr(args, flag)
        inputs[flag] = media_input.read_array(path, f"--{flag.replace('_', '-')}") if path is not None else None
    _warn_changes(args, inputs)
    if inputs["actions"] is not None and inputs["normalizer"] is not None:
        inputs["actions"] = inputs["normalizer"].to_model(inputs["actions"]).astype("float32")
    return inputs


def _warn_changes(args: argparse.Namespace, inputs: dict[str, Any]) -> None:
    video, actions = inputs["video"], inputs["actions"]
    if args.action_mode is not None:
        want = args.chunk + 1
        if actions is not None and actions.ndim == 2 and actions.shape[0] != args.chunk:
            change = (f"only the first {args.chunk} are used" if actions.shape[0] > args.chunk
                      else "its last row is repeated to fill the chunk")
            _warn(f"--actions has {actions.shape[0]} rows but --chunk is {args.chunk}: {change}")
        if video is not None and args.action_mode != "inverse_dynamics":
            _warn(f"--video: {args.action_mode} uses only the first of its {video.shape[0]} frames")
        elif video is not None and video.shape[0] != want:
            change = (f"only the first {want} are used" if video.shape[0] > want
                      else f"its last frame is repeated to make {want}")
            _warn(f"--video has {video.shape[0]} frames but --chunk {args.chunk} needs {want}: {change}")
    elif video is not None:
        keep = max(args.condition_frames or (0, 1)) * _TEMPORAL + 1
        if video.shape[0] < keep:
            _warn(f"--video has {video.shape[0]} frames but --condition-frames needs {keep}: its last frame is "
                  "repeated")


def build_request(args: argparse.Namespace, inputs: dict[str, Any]) -> Any:
    """The GenerationRequest for parsed arguments and the inputs `read_inputs` read."""
    from cosmos_jax.sampling.request import GenerationRequest

    guidance = args.guidance if args.guidance is not None else (1.0 if args.action_mode else 6.0)
    video = list(inputs["video"]) if inputs["video"] is not None else None
    return GenerationRequest(
        args.prompt, args.negative_prompt, image=inputs["image"], video=video, action_mode=args.action_mode,
        domain=args.domain, actions=inputs["actions"], chunk=args.chunk, resolution_tier=args.resolution_tier,
        view_point=args.view_point, condition_frames=tuple(args.condition_frames or (0, 1)),
        num_frames=args.num_frames, height=args.height, width=args.width, fps=args.fps, steps=args.steps,
        guidance=guidance, seed=args.seed, enable_sound=args.sound, init_noise=inputs["init_noise"],
        init_sound_noise=inputs["init_sound_noise"], init_action_noise=inputs["init_action_noise"],
        output_type=args.output_type,
    )


def check_work(pipeline: Any, args: argparse.Namespace, request: Any) -> None:
    """Print the request's work estimate; refuse (ValueError naming --height/--width) sizes that cannot fit."""
    from cosmos_jax.sampling import work_estimate

    prep = pipeline.prepare(request)
    vae = pipeline.vae.config.decoder_dims[0] if pipeline.vae is not None and args.output_type == "video" else None
    dense = pipeline.model.attention == "xla"

    sf = pipeline.vae.config.spatial_compression if pipeline.vae is not None else 16

    data = pipeline.data_size
    batch = min(args.num_samples, args.batch_size or data)
    per_device = -(-batch // data)

    def at(height: int, width: int, latent: tuple[int, int, int] | None = None) -> work_estimate.WorkEstimate:
        latent = latent or (prep.latent_shape[0], height // sf, width // sf)
        return work_estimate.estimate(
            pipeline.config, frames=prep.num_frames, height=height, width=width, latent_shape=latent,
            text_tokens=len(prep.cond_ids), other_tokens=prep.sound_len + prep.action_len, steps=args.steps,
            branches=2 if prep.use_cfg else 1, decoder_width=vae, dense_attention=dense,
            samples=args.num_samples, samples_per_device=per_device)

    estimate = at(prep.height, prep.width, prep.latent_shape)
    limit = work_estimate.available_bytes()
    if limit is not None and estimate.bytes > 0.9 * limit:
        height, width = prep.height, prep.width
        while height > 16 and width > 16 and at(height, width).bytes > 0.9 * limit:
            height, width = max(16, int(height * 0.9) // 16 * 16), max(16, int(width * 0.9) // 16 * 16)
        raise ValueError(f"--height {prep.height} --width {prep.width} with {prep.num_frames} frames needs at least "
                         f"{estimate.bytes / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB this device has; "
                         f"about --height {height} --width {width} would fit")
    import jax

    rate = work_estimate.matmul_rate() if jax.devices()[0].platform == "cpu" else None
    print(f"{prep.mode} {prep.num_frames}x{prep.height}x{prep.width}: {work_estimate.format_estimate(estimate, rate)}",
          file=sys.stderr)
    if rate and estimate.flops / rate > 300:
        print("note: that is long on a CPU; --num-frames, --height, --width and --steps make it smaller "
              "(e.g. --num-frames 9 --height 64 --width 64 --steps 4)", file=sys.stderr)


def _write_result(result: Any, args: argparse.Namespace, output: str, normalizer: Any) -> list[str]:
    """Write one sample's outputs at `output` (side files named after it); returns the written paths."""
    from cosmos_jax.sampling import media

    stem = media.output_stem(output)
    written: list[str] = []
    if args.output_type == "latent":
        media.write_npy(output, result.latents)
        written.append(output)
        if result.sound_latents is not None:
            written.append(f"{stem}.sound_latents.npy")
            media.write_npy(written[-1], result.sound_latents)
    else:
        written += media.write_video_outputs(stem, result.video, result.fps, result.sound, result.sample_rate)
    if result.actions is not None:
        written += media.write_actions(stem, result.actions, domain=args.domain, mode=result.mode,
                                       normalizer=normalizer)
    return written


def sample_output(output: str, index: int) -> str:
    """`out/clip.mp4`, 3 -> `out/clip-00003.mp4`: where sample `index` of a --num-samples run is written."""
    from cosmos_jax.sampling import media

    stem = media.output_stem(output)
    return f"{stem}-{index:05d}{output[len(stem):]}"


def generate_and_write(pipeline: Any, args: argparse.Namespace, inputs: dict[str, Any] | None = None) -> list[str]:
    """Run the pipeline for parsed arguments and write every output; returns the written paths."""
    import time

    from cosmos_jax.sampling import media

    inputs = read_inputs(args) if inputs is None else inputs
    request = build_request(args, inputs)
    if args.num_samples == 1 and args.mesh is None:
        result = pipeline(request, progress=not args.no_progress)
        t = result.timings
        print(f"{result.mode}: compile {t['compile']:.1f}s, denoise {t['denoise']:.2f}s, decode {t['decode']:.1f}s",
              file=sys.stderr)
        return _write_result(result, args, args.output, inputs["normalizer"])
    import jax

    numbered = args.num_samples > 1
    written: list[str] = []
    start = time.perf_counter()
    count = 0
    for result in pipeline.generate_samples([request], num_samples=args.num_samples, batch_size=args.batch_size,
                                            progress=not args.no_progress):
        path = sample_output(args.output, result.sample_index) if numbered else args.output
        written += _write_result(result, args, path, inputs["normalizer"])
        count += 1
    seconds = time.perf_counter() - start
    if numbered and jax.process_index() == 0:
        listing = f"{media.output_stem(args.output)}.samples.json"
        media.write_json(listing, {
            "prompt": args.prompt, "mode": request.action_mode or "vision", "seed": args.seed,
            "noise_key": "jax.random.fold_in(jax.random.key(seed), sample_index)",
            "samples": [{"sample_index": k, "seed": args.seed, "output": sample_output(args.output, k)}
                        for k in range(args.num_samples)],
        })
        written.append(listing)
    print(f"{count} samples in {seconds:.1f}s ({count / seconds:.3g} samples/s) on process {jax.process_index()}",
          file=sys.stderr)
    return written


def warm(pipeline: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> None:
    """--warm-only: every program `generate_and_write` would run, compiled into the compile cache and not run
    (`cosmos_jax.aot`); one line per program and a total on stderr, nothing written."""
    import time

    from cosmos_jax import aot

    request = build_request(args, inputs)
    start = time.perf_counter()
    with aot.compile_only(on_compiled=lambda c: print(c.line(), file=sys.stderr)) as warming:
        if args.num_samples == 1 and args.mesh is None:
            pipeline(request, progress=False)
        else:
            for _ in pipeline.generate_samples([request], num_samples=args.num_samples, batch_size=args.batch_size,
                                               progress=False):
                pass
    print(f"warmed: {warming.summary()}, {time.perf_counter() - start:.1f}s in all", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        options = check_model_arguments(args)
        _check_args(args)
        _check_counts(args)
        inputs = read_inputs(args)
    except ValueError as e:
        return errors.report(e)
    from cosmos_jax.compile_cache import enable as enable_compile_cache

    enable_compile_cache()
    import jax

    from cosmos_jax.sharding import load_mesh_preset, make_mesh

    try:
        if args.distributed:
            jax.distributed.initialize()
        mesh = rules = None
        if args.mesh is not None:
            mesh, rules = make_mesh(args.mesh), load_mesh_preset(args.mesh_rules).rules
        pipeline = load_pipeline(args, options, mesh=mesh, rules=rules)
        check_work(pipeline, args, build_request(args, inputs))
        if args.warm_only:
            warm(pipeline, args, inputs)
            return 0
        written = generate_and_write(pipeline, args, inputs)
    except (ValueError, FileNotFoundError) as e:
        return errors.report(flag_names(errors.one_line(e)))
    for path in written:
        print(path)
    return 0

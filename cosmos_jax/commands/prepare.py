"""`cosmos-jax prepare lerobot SRC DST --model MODEL_DIR`: a LeRobot v3.0 or v2.x dataset -> cosmos-jax training data.

Clips of --frames (1+4k) frames are cut from every episode of camera --video-key (or of every camera, each as
its own clips, with --all-cameras), resized to cover --size and centre-cropped, encoded with the model folder's
Wan VAE (normalised latents), captioned with the episode's task text through the folder's text tokenizer, and
written with their action rows and the --domain embodiment id in the format `cosmos-jax train --data` reads (cosmos_jax/training/data.py), with `action_stats.json` (the
per-channel stats of the actions written, in raw units) beside them. Delta actions (--action-kind delta, the
registry's default for relative-pose domains) are summed over the frames that resampling skips. Needs pyarrow
(`pip install 'cosmos-jax[lerobot]'`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp

from cosmos_jax.datasets.embodiments import ACTION_KINDS, names_of_domain_id
from cosmos_jax.datasets.lerobot_prepare import (
    BadEpisode,
    PrepareConfig,
    Tokenize,
    prepare_lerobot,
)
from cosmos_jax.sampling.prompts import (
    EMBODIMENT_DOMAINS,
    ChatTokenizer,
    build_prompt_ids,
)

EPILOG = """\
example:
  cosmos-jax prepare lerobot ~/data/pusht ~/data/pusht-cosmos --model ~/models/Cosmos3-Nano \\
      --frames 17 --size 256x256 --video-key observation.image --domain pusht --skip-bad

Bad episodes (missing, truncated or unreadable video or parquet, a video shorter than its episode, data
columns that disagree with info.json's features, non-finite actions, wrong action width, an episode missing
from the episode metadata) stop the run with the episode index, or are listed and skipped with --skip-bad. The output appears at
DST only when complete (it is written to a temporary folder beside DST, then renamed)."""


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 256x256, got {text!r}") from None
    return height, width


def _domain(text: str) -> int:
    if text.lstrip("-").isdigit():
        return int(text)
    if text not in EMBODIMENT_DOMAINS:
        raise argparse.ArgumentTypeError(f"unknown domain {text!r}: an integer id or one of {sorted(EMBODIMENT_DOMAINS)}")
    return EMBODIMENT_DOMAINS[text]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="source_format", metavar="FORMAT")
    sub.required = True
    lerobot = sub.add_parser("lerobot", help="a LeRobot v3.0 or v2.x dataset folder (meta/info.json, data/, videos/)",
                             description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    lerobot.add_argument("src", metavar="SRC", help="LeRobot v3.0 or v2.x dataset folder")
    lerobot.add_argument("dst", metavar="DST", help="output folder (cosmos-jax training data)")
    lerobot.add_argument("--model", required=True, metavar="MODEL_DIR",
                         help="Hub-layout or converted model folder: its vae/, text_tokenizer/ and transformer config")
    lerobot.add_argument("--frames", type=int, default=17, help="frames per clip, 1+4k (default 17: 16 actions)")
    lerobot.add_argument("--size", type=_size, default=(256, 256), metavar="HxW",
                         help="clip size in pixels, multiples of 32 for Cosmos 3 (default 256x256)")
    lerobot.add_argument("--video-key", default=None,
                         help="camera feature, e.g. observation.images.top (default: the dataset's only video)")
    lerobot.add_argument("--all-cameras", action="store_true",
                         help="every camera of the dataset, each as its own clips (sample ids end in the camera)")
    lerobot.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: --frames)")
    lerobot.add_argument("--fps", type=float, default=None, help="resample clips down to this rate (default: source)")
    lerobot.add_argument("--action-key", default="action", help="action column (default: action)")
    lerobot.add_argument("--action-kind", choices=ACTION_KINDS, default=None,
                         help="absolute/target: resampling takes the row at each kept frame; delta: it sums the "
                              "rows over the skipped frames (default: the --domain's kind in the registry)")
    lerobot.add_argument("--no-actions", action="store_true", help="video-only data (text->video training)")
    lerobot.add_argument("--domain", type=_domain, default=None,
                         help="embodiment domain: an id in [0, 32) or a name such as pusht, bridge_orig_lerobot")
    lerobot.add_argument("--caption", choices=("raw", "chat"), default="raw",
                         help="raw: token ids of the task text; chat: the generation prompt built around it "
                              "(system prompt, duration and resolution sentences, as at inference)")
    lerobot.add_argument("--batch", type=int, default=4, help="clips per VAE call")
    lerobot.add_argument("--vae-dtype", choices=("float32", "bfloat16"), default="float32",
                         help="VAE compute dtype (latents are stored as float32)")
    lerobot.add_argument("--skip-bad", action="store_true", help="list and skip bad episodes instead of stopping")
    lerobot.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    lerobot.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _tokenizer(args: argparse.Namespace, tokenizer_dir: Path, fps: float) -> Tokenize:
    tokenizer = ChatTokenizer.from_dir(tokenizer_dir)
    if args.caption == "raw":
        return tokenizer.encode
    height, width = args.size

    def chat(task: str) -> list[int]:
        return build_prompt_ids(tokenizer, task, num_frames=args.frames, height=height, width=width, fps=fps)

    return chat


def run(args: argparse.Namespace) -> int:
    from cosmos_jax.convert.load import load
    from cosmos_jax.datasets.embodiments import EMBODIMENTS
    from cosmos_jax.datasets.lerobot_reader import open_lerobot

    if args.no_actions == (args.domain is not None):
        raise SystemExit("give --domain for action data, or --no-actions for video-only data (not both)")
    model = load(args.model, components=("vae", "tokenizer"))
    if model.vae_config is None or model.tokenizer_dir is None:
        raise SystemExit(f"{args.model}: the model folder needs vae/ and text_tokenizer/")
    height, width = args.size
    kinds = {EMBODIMENTS[n].kind for n in names_of_domain_id(args.domain or 0)} - {None}
    kind = args.action_kind or (kinds.pop() if len(kinds) == 1 else "absolute")
    config = PrepareConfig(frames=args.frames, height=height, width=width, video_key=args.video_key,
                           stride=args.stride, fps=args.fps, action_key=None if args.no_actions else args.action_key,
                           domain=args.domain or 0, batch_size=args.batch, skip_bad=args.skip_bad,
                           all_cameras=args.all_cameras, action_kind=kind)
    cfg = model.transformer_config
    try:
        fps = args.fps or open_lerobot(args.src).fps
        report = prepare_lerobot(
            args.src, args.dst, model.vae_config, model.vae_params, _tokenizer(args, model.tokenizer_dir, fps), config,
            latent_patch_size=cfg.latent_patch_size, action_dim=cfg.action_dim if cfg.action_gen else 0,
            num_domains=cfg.num_embodiment_domains, overwrite=args.overwrite, progress=args.progress,
            vae_dtype=jnp.dtype(args.vae_dtype),
        )
    except BadEpisode as e:
        print(f"{e} (pass --skip-bad to skip such episodes)", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"dst": args.dst, "samples": report.samples, "episodes": report.episodes,
                      "bad_episodes": [{"episode": i, "reason": r} for i, r in report.bad_episodes],
                      "short_episodes": report.short_episodes, "max_caption_len": report.max_caption_len,
                      "action_stats": report.stats_file, "action_kind": kind if config.action_key else None}, indent=1))
    return 0

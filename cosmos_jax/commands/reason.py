"""`cosmos-jax reason`: answer in text about a prompt, images or a video with the Cosmos 3 reasoner, streaming.

Reads the reasoner from the root of a model folder (config.json + safetensors; tokenizer files at the root or in
text_tokenizer/, optional preprocessor_config.json / video_preprocessor_config.json): a Hub pipeline folder or a
converted one through `cosmos_jax.convert.load.load` (the language tower shared with transformer/), or a bare reasoner
folder as transformers saves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from cosmos_jax import reasoner_inputs as ri
from cosmos_jax.commands import errors
from cosmos_jax.convert import orbax_io
from cosmos_jax.convert.load import check_reasoner_weights, load, load_reasoner, reasoner_tower
from cosmos_jax.modeling.reasoner import Params, Reasoner, ReasonerConfig
from cosmos_jax.sampling import generation_config, media, media_input, reason
from cosmos_jax.sampling import reasoner_folder as folder
from cosmos_jax.sampling.prompts import ChatTokenizer

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
EPILOG = """\
examples (on the demo checkpoint `cosmos-jax demo` builds; its reasoner is the transformer's text tower):
  cosmos-jax reason --model ~/.cache/cosmos-jax/demo/checkpoint --prompt "What is on the table?" \\
      --max-new-tokens 8
  cosmos-jax reason --model Cosmos3-Nano --prompt "Describe the scene." --video clip.mp4 --temperature 0

Sampling defaults come from the model folder's generation_config.json (as in transformers and vLLM); the
settings used, and where each came from, are printed to stderr before decoding."""


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="Hub-layout or converted model folder, or a bare reasoner folder (reasoner at its root)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--video", metavar="PATH",
                        help="a video file (mp4, ...), a folder of PNG/JPEG frames or a .npy [T, H, W, 3] clip")
    parser.add_argument("--video-fps", type=float, default=2.0, help="frames sampled per second of video")
    parser.add_argument("--source-fps", type=float, default=24.0,
                        help="frame rate of a frames folder or .npy clip (video files carry their own)")
    parser.add_argument("--system", help="optional system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="most tokens to generate (default: generation_config.json's max_new_tokens, else "
                             f"{generation_config.DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy argmax (default: greedy when generation_config.json has no do_sample "
                             "true, else its temperature, else 1.0)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus mass in (0, 1] (default: generation_config.json's top_p when sampling, else 1)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="0 = off (default: generation_config.json's top_k when sampling, else 50)")
    parser.add_argument("--presence-penalty", type=float, default=None,
                        help="subtracted from already generated tokens' logits (default: generation_config.json's "
                             "presence_penalty, else 0; at temperature 0 only when given here)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weight and compute dtype")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "blocked", "pallas"),
                        help="attention over the K/V cache (auto: Pallas on GPU/TPU, blocked on CPU)")
    parser.add_argument("--output-ids", metavar="FILE.json", help="write prompt and generated token ids here")
    parser.epilog = EPILOG


def load_model(model_dir: str, dtype: Any, attention: str = "xla") -> tuple[reason.Reasoner, Params]:
    """The reasoner and its params from a pipeline folder (Hub or converted) or a bare reasoner folder;
    `attention` picks the language tower's implementation (see cosmos_jax.modeling.attention)."""
    root = Path(model_dir)
    if not (orbax_io.is_converted(root) or (root / "transformer").is_dir()):
        model, params = load_reasoner(root, dtype)
        return dataclasses.replace(model, attention=attention), params
    loaded = load(root, dtype=dtype, components=("reasoner",)).reasoner
    if loaded is None:
        print(f"note: {root} has no root reasoner files (config.json + model*.safetensors); using the "
              "transformer's reasoner tower, text only", file=sys.stderr)
        config, params = reasoner_tower(root, dtype)
        return Reasoner(config, dtype=dtype, attention=attention), params
    return dataclasses.replace(loaded.model(), attention=attention), loaded.params


def read_media(args: argparse.Namespace) -> tuple[list[Any], ri.VideoClip | None]:
    """The --image files (uint8 [H, W, 3]) and the --video clip, sampled at --video-fps; ValueError naming them."""
    images = [media_input.read_image(path, "--image") for path in args.image]
    clip = None
    if args.video:
        source = media_input.read_clip(args.video, "--video")
        clip = ri.sample_frames(source.frames, source.fps or args.source_fps, args.video_fps)
    return images, clip


def build_prompt(args: argparse.Namespace, tokenizer: ChatTokenizer, config: ReasonerConfig,
                 media: tuple[list[Any], ri.VideoClip | None] | None = None) -> ri.PreparedPrompt:
    """The chat-formatted, placeholder-expanded prompt for the command-line arguments (`media` from
    `read_media`, read here when None)."""
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: nothing to reason about")
    if (args.image or args.video) and config.vision is None:
        raise ValueError(f"--image/--video: model type {config.model_type} is loaded without a vision encoder; "
                         "images/video are not supported for it")
    images, clip = read_media(args) if media is None else media
    items, content = [], []
    if args.image:
        image_settings = folder.processor_settings(args.model, folder.IMAGE_PROCESSOR, ri.IMAGE_SETTINGS, config)
    if args.video:
        video_settings = folder.processor_settings(args.model, folder.VIDEO_PROCESSOR, ri.VIDEO_SETTINGS, config)
    for image in images:
        items.append(ri.preprocess_image(image, image_settings))
        content.append({"type": "image"})
    if clip is not None:
        items.append(ri.preprocess_video(clip, video_settings))
        content.append({"type": "video"})
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": content})
    ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
    return ri.expand_placeholders(ids, items, config, tokenizer.encode)


def _check_args(args: argparse.Namespace) -> None:
    """Every flag that needs no model, before anything is loaded."""
    errors.input_path(args.model, "--model", folder=True)
    check_reasoner_weights(args.model)
    for path in args.image:
        errors.input_path(path, "--image")
    errors.input_path(args.video, "--video", folder=None)
    errors.finite(args.temperature, "--temperature", low=0)
    errors.finite(args.top_p, "--top-p", low=0, low_open=True, high=1)
    errors.finite(args.presence_penalty, "--presence-penalty")
    errors.finite(args.video_fps, "--video-fps", low=0, low_open=True)
    errors.finite(args.source_fps, "--source-fps", low=0, low_open=True)
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.output_ids is not None:
        errors.output_path(args.output_ids, "--output-ids")


def sampling_settings(args: argparse.Namespace, tokenizer: ChatTokenizer) -> generation_config.Resolved:
    """The run's sampling settings: flags over the model folder's generation_config.json (printed to stderr)."""
    settings = generation_config.resolve(
        args.model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        presence_penalty=args.presence_penalty, max_new_tokens=args.max_new_tokens,
        tokenizer_eos=tokenizer.eos_token_id)
    print(f"sampling: {settings.describe()}", file=sys.stderr)
    for key in settings.ignored:
        print(f"warning: generation_config.json's {key} is not implemented and is ignored", file=sys.stderr)
    return settings


def run(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
        media_items = read_media(args)
        tokenizer = folder.chat_tokenizer(args.model)
        settings = sampling_settings(args, tokenizer)
        sampling = reason.SamplingParams(settings.temperature, settings.top_k, settings.top_p,
                                         settings.presence_penalty)
        model, params = load_model(args.model, DTYPES[args.dtype], args.attention)
        folder.check_special_tokens(tokenizer, model.config)
        prompt = build_prompt(args, tokenizer, model.config, media_items)
        pad_id = folder.pad_id(tokenizer)
        batch = ri.batch_prompts([prompt], model.config, pad_id)
        steps = reason.stream(model, params, batch, max_new_tokens=settings.max_new_tokens,
                              eos_ids=settings.eos_token_ids, sampling=sampling,
                              rng=jax.random.key(args.seed), pad_id=pad_id)
        generated: list[int] = []
        shown = ""
        start = time.perf_counter()
        first_token_s = None
        for tokens in steps:
            first_token_s = first_token_s or time.perf_counter() - start
            generated.append(int(tokens[0]))
            text = tokenizer.tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(tokenizer.tokenizer.decode(generated, skip_special_tokens=True)[len(shown):] + "\n")
    except ValueError as e:
        return errors.report(e)
    elapsed = time.perf_counter() - start
    print(f"[{len(generated)} tokens, first after {first_token_s or 0:.2f}s, {elapsed:.2f}s total]", file=sys.stderr)
    if args.output_ids:
        media.write_json(args.output_ids, {"prompt_ids": list(prompt.ids), "generated_ids": generated})
    return 0

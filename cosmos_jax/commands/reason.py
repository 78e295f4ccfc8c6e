"""`cosmos-jax reason`: answer in text about a prompt, images or a video with the Cosmos 3 reasoner, streaming.

Reads the reasoner from the root of a model folder (config.json + safetensors; tokenizer files at the root or in
text_tokenizer/, optional preprocessor_config.json / video_preprocessor_config.json): a Hub pipeline folder or a
converted one through `cosmos_jax.convert.load.load` (the language tower shared with transformer/), or a bare reasoner
folder as transformers saves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from cosmos_jax import reasoner_inputs as ri
from cosmos_jax.convert import orbax_io
from cosmos_jax.convert.load import load, load_reasoner
from cosmos_jax.modeling.reasoner import Params, Reasoner, ReasonerConfig
from cosmos_jax.sampling import reason
from cosmos_jax.sampling.prompts import ChatTokenizer

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="Hub-layout or converted model folder, or a bare reasoner folder (reasoner at its root)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--video", metavar="PATH", help="a video file or a folder of frames")
    parser.add_argument("--video-fps", type=float, default=2.0, help="frames sampled per second of video")
    parser.add_argument("--system", help="optional system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=20, help="0 = off")
    parser.add_argument("--presence-penalty", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--output-ids", metavar="FILE.json", help="write prompt and generated token ids here")


def _tokenizer(model_dir: str) -> ChatTokenizer:
    for folder in (model_dir, os.path.join(model_dir, "text_tokenizer")):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return ChatTokenizer.from_dir(folder)
    raise ValueError(f"no tokenizer.json at the root of {model_dir} or in its text_tokenizer/ folder")


def load_model(model_dir: str, dtype: Any) -> tuple[reason.Reasoner, Params]:
    """The reasoner and its params from a pipeline folder (Hub or converted) or a bare reasoner folder."""
    root = Path(model_dir)
    if not (orbax_io.is_converted(root) or (root / "transformer").is_dir()):
        return load_reasoner(root, dtype)
    loaded = load(root, dtype=dtype, components=("reasoner",)).reasoner
    if loaded is None:
        raise ValueError(f"{root} has no reasoner weights at its root (config.json + model*.safetensors)")
    return loaded.model(), loaded.params


def _eos_ids(model_dir: str, tokenizer: ChatTokenizer) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return tuple(sorted(ids))


def _check_special_tokens(tokenizer: ChatTokenizer, config: ReasonerConfig) -> None:
    for token, expected in (("<|image_pad|>", config.image_token_id), ("<|video_pad|>", config.video_token_id),
                            ("<|vision_start|>", config.vision_start_token_id),
                            ("<|vision_end|>", config.vision_end_token_id)):
        if tokenizer.tokenizer.token_to_id(token) not in (None, expected):
            raise ValueError(f"tokenizer id of {token} differs from the model config ({expected})")


def _settings(model_dir: str, name: str, default: ri.ProcessorSettings, config: ReasonerConfig
              ) -> ri.ProcessorSettings:
    """Processor settings from `name` in the model folder, patch geometry taken from the model's vision config."""
    path = os.path.join(model_dir, name)
    vision = config.vision
    geometry = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                "merge_size": vision.spatial_merge_size}
    if os.path.isfile(path):
        settings = ri.ProcessorSettings.from_file(path, default)
        for key, value in geometry.items():
            if getattr(settings, key) != value:
                raise ValueError(f"{path}: {key} {getattr(settings, key)} differs from the model's {value}")
        return settings
    return dataclasses.replace(default, **geometry)


def build_prompt(args: argparse.Namespace, tokenizer: ChatTokenizer, config: ReasonerConfig
                 ) -> ri.PreparedPrompt:
    """The chat-formatted, placeholder-expanded prompt for the command-line arguments."""
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: nothing to reason about")
    if (args.image or args.video) and config.vision is None:
        raise ValueError(f"model type {config.model_type} is loaded without a vision encoder; images/video "
                         "are not supported for it")
    items, content = [], []
    image_settings = _settings(args.model, "preprocessor_config.json", ri.IMAGE_SETTINGS, config)
    video_settings = _settings(args.model, "video_preprocessor_config.json", ri.VIDEO_SETTINGS, config)
    for path in args.image:
        items.append(ri.preprocess_image(ri.load_image(path), image_settings))
        content.append({"type": "image"})
    if args.video:
        items.append(ri.preprocess_video(ri.load_video(args.video, args.video_fps), video_settings))
        content.append({"type": "video"})
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": content})
    ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
    return ri.expand_placeholders(ids, items, config, tokenizer.encode)


def run(args: argparse.Namespace) -> int:
    try:
        sampling = reason.SamplingParams(args.temperature, args.top_k, args.top_p, args.presence_penalty)
        if not os.path.isdir(args.model):
            raise ValueError(f"model folder not found: {args.model}")
        tokenizer = _tokenizer(args.model)
        model, params = load_model(args.model, DTYPES[args.dtype])
        _check_special_tokens(tokenizer, model.config)
        prompt = build_prompt(args, tokenizer, model.config)
        pad = tokenizer.special_tokens.get("pad_token")
        pad_id = tokenizer.token_id(pad) if pad else 0
        batch = ri.batch_prompts([prompt], model.config, pad_id)
        steps = reason.stream(model, params, batch, max_new_tokens=args.max_new_tokens,
                              eos_ids=_eos_ids(args.model, tokenizer), sampling=sampling,
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"[{len(generated)} tokens, first after {first_token_s or 0:.2f}s, {elapsed:.2f}s total]", file=sys.stderr)
    if args.output_ids:
        with open(args.output_ids, "w", encoding="utf-8") as f:
            json.dump({"prompt_ids": list(prompt.ids), "generated_ids": generated}, f)
    return 0

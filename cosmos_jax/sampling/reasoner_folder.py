"""What the reasoner reads from a model folder besides its weights: the chat tokenizer (tokenizer.json at the
root, else in text_tokenizer/), the image and video processor settings (preprocessor_config.json,
video_preprocessor_config.json, the patch geometry checked against the model's vision config) and the pad id.
`cosmos-jax reason` and the sdg critic read a folder the same way, so they build the same prompt."""

from __future__ import annotations

import dataclasses
import os

from cosmos_jax import reasoner_inputs as ri
from cosmos_jax.modeling.reasoner import ReasonerConfig
from cosmos_jax.sampling.prompts import ChatTokenizer

IMAGE_PROCESSOR = "preprocessor_config.json"
VIDEO_PROCESSOR = "video_preprocessor_config.json"


def chat_tokenizer(model_dir: str | os.PathLike) -> ChatTokenizer:
    """The tokenizer at the root of `model_dir`, else in its text_tokenizer/; ValueError when neither has one."""
    for folder in (os.fspath(model_dir), os.path.join(model_dir, "text_tokenizer")):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return ChatTokenizer.from_dir(folder)
    raise ValueError(f"no tokenizer.json at the root of {model_dir} or in its text_tokenizer/ folder")


def check_special_tokens(tokenizer: ChatTokenizer, config: ReasonerConfig) -> None:
    """ValueError when the tokenizer's vision tokens have other ids than the model config's."""
    if config.vision is None:
        return
    for token, expected in (("<|image_pad|>", config.image_token_id), ("<|video_pad|>", config.video_token_id),
                            ("<|vision_start|>", config.vision_start_token_id),
                            ("<|vision_end|>", config.vision_end_token_id)):
        if tokenizer.tokenizer.token_to_id(token) not in (None, expected):
            raise ValueError(f"tokenizer id of {token} differs from the model config ({expected})")


def processor_settings(model_dir: str | os.PathLike, name: str, default: ri.ProcessorSettings,
                       config: ReasonerConfig) -> ri.ProcessorSettings:
    """Processor settings from the file `name` of the model folder (`default` without one), the patch geometry
    taken from the model's vision config; ValueError when the file's geometry differs from the model's."""
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


def pad_id(tokenizer: ChatTokenizer) -> int:
    """The id left-padded prompt rows and finished rows use: the tokenizer's pad token, else 0."""
    pad = tokenizer.special_tokens.get("pad_token")
    return tokenizer.token_id(pad) if pad else 0

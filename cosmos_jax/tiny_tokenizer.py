"""A tiny Qwen-style tokenizer folder for tests and the demo checkpoint.

Byte-level BPE (the Qwen2/Qwen3-VL pre-tokenizer: NFC, Qwen's split regex, byte-level without prefix space),
trained on a few prompt-like sentences up to ~512 entries, followed by the Qwen special tokens, with a
Qwen-style ChatML chat template in `tokenizer_config.json`. `transformers.AutoTokenizer.from_pretrained(dir)`
loads it as a `Qwen2Tokenizer`, and `cosmos_jax.sampling.prompts.ChatTokenizer` reads the same files.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

VOCAB_SIZE = 512
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2's pre-tokenization pattern: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, and whitespace.
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with Qwen-VL media blocks: string content, or a list of {"type": "text"|"image"|"video", ...} blocks;
# `add_vision_id` numbers pictures and videos; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' or 'image' in block -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + counts.image | string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif block['type'] == 'video' or 'video' in block -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + counts.video | string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in block -%}"
    "{{- block['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_TRAINING_TEXT = (
    "You are a helpful assistant who will generate videos from a give prompt.",
    "You are a helpful assistant who will generate images from a give prompt.",
    "The video is 7.9 seconds long and is of 24 FPS. This video is of 720x1280 resolution.",
    "The video is not 7.9 seconds long and is not of 24 FPS. This video is not of 720x1280 resolution.",
    "This image is of 480x832 resolution. This image is not of 256x256 resolution.",
    "A robot arm picks up a red cube from the wooden table and places it in a blue bowl.",
    "A car drives along a coastal road at sunset while waves break on the rocks below.",
    "This video is captured from a first-person perspective looking at the scene.",
    "This video is captured from a third-person perspective looking towards the agent from the front.",
    "This video is captured from a wrist-mounted camera.",
    "This video contains concatenated views from multiple camera perspectives.",
    '{"cinematography": {"framing": "ego"}, "actions": [{"time": "0:00-0:01", "description": "Open the drawer."}], '
    '"duration": "1s", "fps": 16.0, "resolution": {"H": 480, "W": 640}, "aspect_ratio": "4,3"}',
    "Slow motion, shallow depth of field, soft lighting, cinematic camera movement, high detail, 4K.",
    "blurry, low quality, distorted, watermark, text, jittery motion, overexposed, cartoon.",
)


def _build_tokenizer() -> Tokenizer:
    bpe = models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 262144,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tiny_tokenizer(path: str | os.PathLike) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) into folder `path`."""
    os.makedirs(path, exist_ok=True)
    tokenizer = _build_tokenizer()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(tokenizer), f, indent=2)
        f.write("\n")

"""Prompt construction for Cosmos 3 generation, token for token as `Cosmos3OmniPipeline.tokenize_prompt`.

Text prompts get duration/resolution sentences (negated for the negative prompt); action prompts become the
JSON caption the action model was trained on. The text is wrapped in the tokenizer's own chat template (system
prompt optional), tokenized with `tokenizer.json`, and `[eos, <|vision_start|>]` is appended.

The tokenizer folder is read with the `tokenizers` library and the chat template rendered with jinja2 in a
sandbox configured like transformers' renderer (trim_blocks, lstrip_blocks, loopcontrols, `tojson`,
`raise_exception`, `strftime_now`), so transformers is not needed at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from cosmos_jax.datasets.embodiments import EMBODIMENTS

SYSTEM_PROMPT_IMAGE = "You are a helpful assistant who will generate images from a give prompt."
SYSTEM_PROMPT_VIDEO = "You are a helpful assistant who will generate videos from a give prompt."
VISION_START_TOKEN = "<|vision_start|>"

DURATION_SENTENCE = "The video is {duration:.1f} seconds long and is of {fps:.0f} FPS."
NEGATED_DURATION_SENTENCE = "The video is not {duration:.1f} seconds long and is not of {fps:.0f} FPS."
IMAGE_RESOLUTION_SENTENCE = "This image is of {height}x{width} resolution."
NEGATED_IMAGE_RESOLUTION_SENTENCE = "This image is not of {height}x{width} resolution."
VIDEO_RESOLUTION_SENTENCE = "This video is of {height}x{width} resolution."
NEGATED_VIDEO_RESOLUTION_SENTENCE = "This video is not of {height}x{width} resolution."

ActionMode = Literal["policy", "forward_dynamics", "inverse_dynamics"]
ACTION_MODES: tuple[str, ...] = ("policy", "forward_dynamics", "inverse_dynamics")

# Framing sentence of the action caption's `cinematography.framing`, per camera viewpoint.
VIEWPOINT_SENTENCES: Mapping[str, str] = {
    "ego_view": "This video is captured from a first-person perspective looking at the scene.",
    "third_person_view": (
        "This video is captured from a third-person perspective looking towards the agent from the front."
    ),
    "wrist_view": "This video is captured from a wrist-mounted camera.",
    "concat_view": "This video contains concatenated views from multiple camera perspectives.",
}

# Embodiment name -> index of its domain-aware action projection weights (from the embodiment registry).
EMBODIMENT_DOMAINS: Mapping[str, int] = {name: e.domain_id for name, e in EMBODIMENTS.items()}

# Unpadded action width per embodiment (the registry's channel count). `no_action` and `libero` have no fixed
# width and cannot be used for action inference.
RAW_ACTION_DIM: Mapping[str, int] = {
    name: e.raw_action_dim for name, e in EMBODIMENTS.items() if e.raw_action_dim is not None
}

# Action conditioning canvases (height, width) per resolution tier; a clip gets the one closest in H/W ratio
# (the first listed wins a tie).
ACTION_RESOLUTION_BINS: Mapping[int, tuple[tuple[int, int], ...]] = {
    256: ((256, 256), (256, 320), (320, 256), (192, 320), (320, 192)),
    480: ((640, 640), (544, 736), (736, 544), (480, 832), (832, 480)),
    704: ((960, 960), (832, 1088), (1088, 832), (704, 1280), (1280, 704)),
    720: ((960, 960), (832, 1104), (1104, 832), (720, 1280), (1280, 720)),
}

_CAPTION_ASPECT_RATIOS = ("1,1", "4,3", "3,4", "16,9", "9,16")


def classify_resolution_bin(height: int, width: int, tier: int) -> tuple[int, int]:
    """The (H, W) canvas of `tier` whose H/W ratio is closest to `height/width`."""
    if tier not in ACTION_RESOLUTION_BINS:
        raise ValueError(
            f"unsupported action resolution tier {tier!r}; expected one of {sorted(ACTION_RESOLUTION_BINS)}"
        )
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    ratio = height / width
    return min(ACTION_RESOLUTION_BINS[tier], key=lambda hw: abs(hw[0] / hw[1] - ratio))


def raw_action_dim(domain: str) -> int:
    """Unpadded action width of an embodiment domain; a clear error for unknown or width-less domains."""
    if domain not in EMBODIMENT_DOMAINS:
        raise ValueError(f"unknown embodiment domain {domain!r}; expected one of {sorted(EMBODIMENT_DOMAINS)}")
    if domain not in RAW_ACTION_DIM:
        raise ValueError(
            f"domain {domain!r} has no fixed action width and cannot be used for action inference; "
            f"supported: {sorted(RAW_ACTION_DIM)}"
        )
    return RAW_ACTION_DIM[domain]


def _check_geometry(num_frames: int, height: int, width: int, fps: float) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive finite number, got {fps}")


def action_caption(
    description: str, *, view_point: str | None, num_frames: int, fps: float, height: int, width: int
) -> str:
    """The JSON action caption (`json.dumps`, default separators).

    Keys in order: `cinematography.framing` (viewpoint sentence; omitted when `view_point` is None), `actions`
    (one span "0:00-M:SS" over round(num_frames/fps) seconds with the description ending in . ! or ?),
    `duration` ("{int(num_frames/fps)}s"), `fps`, `resolution` {"H", "W"}, `aspect_ratio` (closest of
    1,1 4,3 3,4 16,9 9,16 to W/H).
    """
    _check_geometry(num_frames, height, width, fps)
    if view_point is not None and view_point not in VIEWPOINT_SENTENCES:
        raise ValueError(f"unknown view point {view_point!r}; expected one of {sorted(VIEWPOINT_SENTENCES)} or None")
    seconds_total = num_frames / fps
    minutes, seconds = divmod(round(seconds_total), 60)
    text = description.strip()
    if text and not text.endswith((".", "!", "?")):
        text = f"{text}."
    ratio = width / height
    aspect = min(_CAPTION_ASPECT_RATIOS, key=lambda r: abs(int(r.split(",")[0]) / int(r.split(",")[1]) - ratio))
    caption: dict[str, Any] = {}
    if view_point is not None:
        caption["cinematography"] = {"framing": VIEWPOINT_SENTENCES[view_point]}
    caption["actions"] = [{"time": f"0:00-{minutes}:{seconds:02d}", "description": text}]
    caption["duration"] = f"{int(seconds_total)}s"
    caption["fps"] = float(fps)
    caption["resolution"] = {"H": int(height), "W": int(width)}
    caption["aspect_ratio"] = aspect
    return json.dumps(caption)


def _append_sentence(base: str, sentence: str) -> str:
    """Join with ". " after dropping the base's trailing dots; an empty base gives just the sentence."""
    base = base.rstrip(".")
    return f"{base}. {sentence}" if base else sentence


def prompt_text(
    prompt: str,
    *,
    negative: bool = False,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    add_duration_template: bool = True,
    add_resolution_template: bool = True,
    action_mode: ActionMode | None = None,
    view_point: str | None = "ego_view",
) -> str:
    """The user-turn text: the prompt with metadata sentences, the action caption, or (negative, action) as is."""
    _check_geometry(num_frames, height, width, fps)
    if action_mode is not None:
        if action_mode not in ACTION_MODES:
            raise ValueError(f"unknown action mode {action_mode!r}; expected one of {list(ACTION_MODES)}")
        if negative:
            return prompt
        return action_caption(
            prompt, view_point=view_point, num_frames=num_frames, fps=fps, height=height, width=width
        )
    is_image = num_frames == 1
    text = prompt
    if not is_image and add_duration_template:
        template = NEGATED_DURATION_SENTENCE if negative else DURATION_SENTENCE
        text = _append_sentence(text, template.format(duration=num_frames / fps, fps=fps))
    if add_resolution_template:
        if is_image:
            template = NEGATED_IMAGE_RESOLUTION_SENTENCE if negative else IMAGE_RESOLUTION_SENTENCE
        else:
            template = NEGATED_VIDEO_RESOLUTION_SENTENCE if negative else VIDEO_RESOLUTION_SENTENCE
        text = _append_sentence(text, template.format(height=height, width=width))
    return text


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


@functools.lru_cache(maxsize=8)
def _sandboxed_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox set up like transformers' chat renderer."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
    """A tokenizer folder: `tokenizer.json`, its special tokens and its chat template."""

    tokenizer: Tokenizer
    chat_template: str
    special_tokens: Mapping[str, str]  # e.g. {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ChatTokenizer:
        """Load like `AutoTokenizer`: `chat_template.jinja` wins over `tokenizer_config.json`'s `chat_template`."""
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"no tokenizer.json in tokenizer folder {path!r}")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file, encoding="utf-8") as f:
                    config.update(json.load(f))
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}.get("default")
        template_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        if not isinstance(template, str):
            raise ValueError(
                f"tokenizer folder {path!r} has no chat template (chat_template.jinja or tokenizer_config.json)"
            )
        special = {k: _token_content(config[k]) for k in _SPECIAL_TOKEN_KEYS if _token_content(config.get(k))}
        return cls(Tokenizer.from_file(tokenizer_file), template, special)

    def token_id(self, token: str) -> int:
        """Id of a (special) token; a clear error if the vocabulary lacks it."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def eos_token_id(self) -> int:
        if "eos_token" not in self.special_tokens:
            raise ValueError("the tokenizer config defines no eos_token")
        return self.token_id(self.special_tokens["eos_token"])

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The chat template applied to `messages` (special tokens and kwargs visible to the template)."""
        return _sandboxed_template(self.chat_template).render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings matched, no extra special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def build_prompt_ids(
    tokenizer: str | os.PathLike | ChatTokenizer,
    prompt: str,
    *,
    negative: bool = False,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    use_system_prompt: bool = True,
    add_duration_template: bool = True,
    add_resolution_template: bool = True,
    action_mode: ActionMode | None = None,
    view_point: str | None = "ego_view",
) -> list[int]:
    """Token ids of one CFG branch: chat(system?, user text) + [eos, <|vision_start|>].

    `negative=True` builds the unconditional branch (negated sentences; the raw text in action modes).
    """
    if not isinstance(tokenizer, ChatTokenizer):
        tokenizer = ChatTokenizer.from_dir(tokenizer)
    text = prompt_text(
        prompt,
        negative=negative,
        num_frames=num_frames,
        height=height,
        width=width,
        fps=fps,
        add_duration_template=add_duration_template,
        add_resolution_template=add_resolution_template,
        action_mode=action_mode,
        view_point=view_point,
    )
    messages = []
    if use_system_prompt:
        messages.append({"role": "system", "content": SYSTEM_PROMPT_IMAGE if num_frames == 1 else SYSTEM_PROMPT_VIDEO})
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.render_chat(messages, add_generation_prompt=True, add_vision_id=False)
    return tokenizer.encode(rendered) + [tokenizer.eos_token_id, tokenizer.token_id(VISION_START_TOKEN)]


def build_prompt_pair(
    tokenizer: str | os.PathLike | ChatTokenizer,
    prompt: str,
    negative_prompt: str | None = None,
    **kwargs: Any,
) -> tuple[list[int], list[int]]:
    """(conditional, unconditional) ids as the reference's `tokenize_prompt`; `None` negative prompt means ""."""
    if not isinstance(tokenizer, ChatTokenizer):
        tokenizer = ChatTokenizer.from_dir(tokenizer)
    cond = build_prompt_ids(tokenizer, prompt, negative=False, **kwargs)
    uncond = build_prompt_ids(tokenizer, negative_prompt or "", negative=True, **kwargs)
    return cond, uncond

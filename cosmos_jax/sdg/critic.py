"""The optional critic of `cosmos-jax sdg --critic`: the reasoner tower of the same checkpoint answers one fixed
question about every candidate clip; its answer is kept verbatim and read as a 1–5 score, or as missing.

The question is `QUESTION`, verbatim (report.json repeats it):

    Is the motion in this video physically plausible? Rate it on a scale from 1 (impossible) to 5 (fully
    plausible). Answer with a single digit.

The clip reaches the reasoner as one video, exactly as `cosmos-jax reason --video` feeds one: frames sampled at
`SAMPLE_FPS` per second of the clip's own fps (at least 4, `reasoner_inputs.sample_frames`), resized and
normalised with the model folder's video processor settings (video_preprocessor_config.json), one timestamped
`<|vision_start|>…<|vision_end|>` span per temporal patch, in a single user turn without a system prompt. A video
rather than a few still images, because the video path gives the reasoner the frames in time order with their
timestamps (temporal patches), and plausibility is a question about motion. Decoding is greedy (temperature 0,
no penalty), at most `MAX_NEW_TOKENS` new tokens, one clip per call, so an answer depends on the clip and the
weights only: not on which clips share a batch, on the process, or on a resume.

`parse_score` reads the answer strictly, without guessing:
1. a fraction "N/5", "N out of 5" or "N (out of 5)" counts as the number N (its 5 is the scale, not a second
   number);
2. the numbers of the answer are the runs of ASCII digits, with an optional leading "-" and an optional decimal
   part ".digits", that touch no letter, digit or underscore on either side ("4th", "v2" and "x3" are not
   numbers; the full stop after "5." is not a decimal part);
3. the score is that value when the answer has at least one number, every number has the same value, and the
   value is an integer from 1 to 5. Anything else is missing (None): no number ("plausible", ""), two different
   numbers ("2 or 3", "between 2 and 4", "on a scale of 1 to 5: 4"), a decimal ("3.5"), a value outside 1..5
   ("0", "7", "10", "-3").
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from cosmos_jax import reasoner_inputs as ri
from cosmos_jax.convert.load import (
    check_reasoner_weights,
    has_root_reasoner,
    load_root_reasoner,
    locate,
    read_reasoner_config,
)
from cosmos_jax.modeling.reasoner import Params, Reasoner
from cosmos_jax.modeling.weights import is_quantized
from cosmos_jax.sampling import generation_config, reason
from cosmos_jax.sampling import reasoner_folder as folder
from cosmos_jax.sampling.prompts import ChatTokenizer

QUESTION = ("Is the motion in this video physically plausible? Rate it on a scale from 1 (impossible) to 5 "
            "(fully plausible). Answer with a single digit.")
MAX_NEW_TOKENS = 16
SAMPLE_FPS = 2.0
SCORES = (1, 2, 3, 4, 5)

Answerer = Callable[[np.ndarray, float], str]  # (frames [F, H, W, 3] uint8, fps) -> the raw answer

_EDGE = "0-9A-Za-z_"
_FRACTION = re.compile(rf"(?<![{_EDGE}.])([0-9]+)\s*(?:(?:/|out\s+of)\s*5|\(\s*(?:/|out\s+of)\s*5\s*\))"
                       rf"(?![{_EDGE}]|\.[0-9])", re.IGNORECASE)
_NUMBER = re.compile(rf"(?<![{_EDGE}.])-?[0-9]+(?:\.[0-9]+)?(?![{_EDGE}])")


def parse_score(answer: str) -> int | None:
    """The 1–5 score of an answer by the rule of the module docstring; None when it has none or is ambiguous."""
    numbers = _NUMBER.findall(_FRACTION.sub(r"\1", answer))
    if any("." in number for number in numbers):
        return None
    values = {int(number) for number in numbers}
    if len(values) != 1 or not values <= set(SCORES):
        return None
    return values.pop()


@dataclasses.dataclass(frozen=True)
class Critique:
    """One clip's critic result: the score (None: the answer holds no unambiguous 1–5) and the raw answer."""

    score: int | None
    answer: str


def critique(answerer: Answerer, frames: np.ndarray, fps: float) -> Critique:
    """Ask `answerer` about the clip frames [F, H, W, 3] uint8 played at `fps` and parse its answer."""
    answer = answerer(frames, fps)
    return Critique(parse_score(answer), answer)


class Critic:
    """The reasoner with its vision encoder, asking `QUESTION` about one clip per call (module docstring)."""

    def __init__(self, model: Reasoner, params: Params, tokenizer: ChatTokenizer,
                 video_settings: ri.ProcessorSettings, eos_ids: tuple[int, ...],
                 max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        if model.config.vision is None:
            raise ValueError("the critic watches the clip: it needs a reasoner with a vision encoder")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.video_settings = video_settings
        self.eos_ids = tuple(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.pad_id = folder.pad_id(tokenizer)

    def prompt(self, frames: np.ndarray, fps: float) -> ri.PreparedPrompt:
        """The chat prompt (the clip as one video, then `QUESTION`), vision placeholders expanded."""
        clip = ri.sample_frames(np.asarray(frames, np.uint8), float(fps), SAMPLE_FPS)
        item = ri.preprocess_video(clip, self.video_settings)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
        ids = self.tokenizer.encode(self.tokenizer.render_chat(messages, add_generation_prompt=True))
        return ri.expand_placeholders(ids, [item], self.model.config, self.tokenizer.encode)

    def answer_ids(self, frames: np.ndarray, fps: float) -> list[int]:
        """The greedy answer's token ids, up to and including the first end-of-sequence token."""
        batch = ri.batch_prompts([self.prompt(frames, fps)], self.model.config, self.pad_id)
        tokens, lengths = reason.generate(self.model, self.params, batch, max_new_tokens=self.max_new_tokens,
                                          eos_ids=self.eos_ids, sampling=reason.SamplingParams(),
                                          pad_id=self.pad_id)
        return [int(t) for t in tokens[0, : int(lengths[0])]]

    def __call__(self, frames: np.ndarray, fps: float) -> str:
        """The raw answer text (special tokens left out, as `cosmos-jax reason` prints it)."""
        return self.tokenizer.tokenizer.decode(self.answer_ids(frames, fps), skip_special_tokens=True)


def _no_vision(model_dir: str | os.PathLike) -> ValueError:
    return ValueError(f"--critic needs the reasoner's vision encoder, and {model_dir} has no root reasoner files "
                      "with one (config.json with a vision_config + model*.safetensors)")


def check_critic_model(model_dir: str | os.PathLike) -> None:
    """ValueError unless the folder has root reasoner files with a vision encoder and full-precision language model
    weights (read from its configs only, before any weight is loaded)."""
    layout = locate(model_dir)
    if not has_root_reasoner(layout) or read_reasoner_config(layout.root).vision is None:
        raise _no_vision(model_dir)
    check_reasoner_weights(layout)


def load_critic(model_dir: str | os.PathLike, dtype: Any, *, tower: Params | None = None,
                mesh: jax.sharding.Mesh | None = None) -> Critic:
    """The critic of a pipeline folder: its root reasoner (the vision encoder; the language tower shared with
    `tower`, the loaded pipeline's params["reasoner"], when it is the transformer's), the folder's tokenizer,
    video processor settings and end-of-sequence ids. mesh: the mesh `tower` lives on, over which the vision
    weights are then replicated. ValueError when the folder has no vision encoder."""
    weights = load_root_reasoner(model_dir, dtype=dtype, tower=tower)
    if weights is None or weights.config.vision is None:
        raise _no_vision(model_dir)
    params = dict(weights.params)
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params["vision"] = jax.device_put(params["vision"], replicated)
    tokenizer = folder.chat_tokenizer(model_dir)
    folder.check_special_tokens(tokenizer, weights.config)
    settings = folder.processor_settings(model_dir, folder.VIDEO_PROCESSOR, ri.VIDEO_SETTINGS, weights.config)
    resolved = generation_config.resolve(model_dir, temperature=0.0, presence_penalty=0.0,
                                         max_new_tokens=MAX_NEW_TOKENS, tokenizer_eos=tokenizer.eos_token_id)
    return Critic(weights.model(), params, tokenizer, settings, resolved.eos_token_ids)


def pipeline_critic(pipeline: Any, model_dir: str | os.PathLike, dtype: Any) -> Critic:
    """The critic of the folder a `Cosmos3Pipeline` was loaded from, sharing the pipeline's reasoner tower (and
    its mesh) when the critic can run on it as it is: held in device memory and not quantized; otherwise the
    critic reads its own copy of the tower."""
    tower = pipeline.params.get("reasoner")
    leaves = jax.tree.leaves(tower, is_leaf=is_quantized)
    if tower is None or pipeline.offload_reasoner or any(map(is_quantized, leaves)):
        return load_critic(model_dir, dtype)
    return load_critic(model_dir, dtype, tower=tower, mesh=pipeline.mesh)


def distribution(scores: list[int | None]) -> dict[str, int]:
    """Counts of each score 1..5 and of missing answers (keys "1".."5", "missing")."""
    counts = {str(s): sum(score == s for score in scores) for s in SCORES}
    counts["missing"] = sum(score is None for score in scores)
    return counts


def report_section(kept: list[int | None], candidates: list[int | None]) -> dict[str, Any]:
    """report.json's "critic": the question and decoding, and the score counts of the kept episodes and of every
    candidate."""
    return {"question": QUESTION, "sample_fps": SAMPLE_FPS, "max_new_tokens": MAX_NEW_TOKENS, "decoding": "greedy",
            "kept": distribution(kept), "candidates": distribution(candidates)}

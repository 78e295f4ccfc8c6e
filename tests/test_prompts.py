"""Prompt construction: token ids equal to `Cosmos3OmniPipeline.tokenize_prompt` (diffusers 0.42.1) with the tiny
Qwen-style tokenizer loaded through `transformers.AutoTokenizer`; tables and bin choice equal to the reference's."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, UniPCMultistepScheduler
from diffusers.pipelines.cosmos import pipeline_cosmos3_omni as reference
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer

from cosmos_jax.sampling.prompts import (
    ACTION_RESOLUTION_BINS,
    EMBODIMENT_DOMAINS,
    RAW_ACTION_DIM,
    SYSTEM_PROMPT_IMAGE,
    SYSTEM_PROMPT_VIDEO,
    VIEWPOINT_SENTENCES,
    ChatTokenizer,
    action_caption,
    build_prompt_ids,
    build_prompt_pair,
    classify_resolution_bin,
    raw_action_dim,
)
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def ours(tokenizer_dir) -> ChatTokenizer:
    return ChatTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def pipeline(hf_tokenizer) -> Cosmos3OmniPipeline:
    """The reference pipeline with the tiny tokenizer; a small VAE only because the constructor reads its config."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return Cosmos3OmniPipeline(
        transformer=None,
        text_tokenizer=hf_tokenizer,
        vae=vae,
        scheduler=UniPCMultistepScheduler(),
        enable_safety_checker=False,
    )


def test_tiny_tokenizer_loads_in_transformers_and_tokenizes_alike(tokenizer_dir, tmp_path, hf_tokenizer, ours) -> None:
    assert type(hf_tokenizer).__name__ == "Qwen2Tokenizer"
    assert len(hf_tokenizer) == 520 and ours.tokenizer.get_vocab_size() == 520
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.eos_token_id == ours.eos_token_id == 514
    assert ours.token_id("<|vision_start|>") == hf_tokenizer.convert_tokens_to_ids("<|vision_start|>") == 515
    text = "Ünïcode café x1280 <|im_start|>user\n  tabs\tand 12345 'll <|vision_start|>!!"
    assert ours.encode(text) == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert ours.encode("<|im_start|><|video_pad|>") == [513, 519]
    write_tiny_tokenizer(tmp_path)  # deterministic: the demo can rebuild it byte for byte
    assert filecmp.cmp(tmp_path / "tokenizer.json", tokenizer_dir / "tokenizer.json", shallow=False)


@pytest.mark.parametrize("add_vision_id", [False, True])
def test_chat_rendering_matches_transformers(hf_tokenizer, ours, add_vision_id: bool) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "and"},
                {"type": "video"},
                {"type": "image"},
                {"type": "text", "text": " what now?"},
            ],
        },
        {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": "Again."},
    ]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id
    )
    assert ours.render_chat(messages, add_generation_prompt=True, add_vision_id=add_vision_id) == expected
    assert ("Picture 2: " in expected) == add_vision_id


PROMPT_CASES = {
    "video": dict(prompt="A robot arm stacks cups.", num_frames=121, height=480, width=832, fps=24.0),
    "video_trailing_dots": dict(prompt="Waves at dusk...", num_frames=93, height=256, width=320, fps=29.97),
    "image": dict(prompt="A red cube on a table.", num_frames=1, height=720, width=1280, fps=24.0),
    "negative": dict(
        prompt="A car.", negative_prompt="blurry, low quality.", num_frames=189, height=720, width=1280, fps=24.0
    ),
    "image_negative": dict(
        prompt="A cat", negative_prompt="text, watermark", num_frames=1, height=64, width=96, fps=16.0
    ),
    "no_system_prompt": dict(prompt="A cat.", num_frames=17, height=64, width=96, fps=16.0, use_system_prompt=False),
    "templates_off": dict(
        prompt="A cat.", negative_prompt="ugly", num_frames=17, height=64, width=96, fps=16.0,
        add_duration_template=False, add_resolution_template=False,
    ),
    "duration_off": dict(prompt="A cat.", num_frames=17, height=64, width=96, fps=10.0, add_duration_template=False),
    "empty_prompt": dict(prompt="", num_frames=17, height=64, width=96, fps=16.0),
    "policy_ego": dict(
        prompt="pick up the red block", negative_prompt="bad", num_frames=17, height=480, width=640, fps=16.0,
        action_mode="policy", action_view_point="ego_view",
    ),
    "forward_wrist": dict(
        prompt="Open the drawer!", num_frames=9, height=544, width=736, fps=24.0,
        action_mode="forward_dynamics", action_view_point="wrist_view", use_system_prompt=False,
    ),
    "inverse_third_person": dict(
        prompt="  push the T block  ", num_frames=33, height=832, width=480, fps=4.0,
        action_mode="inverse_dynamics", action_view_point="third_person_view",
    ),
    "policy_concat_long": dict(
        prompt="drive forward", num_frames=1441, height=704, width=1280, fps=16.0,
        action_mode="policy", action_view_point="concat_view",
    ),
    "policy_no_view_point": dict(
        prompt="wave", num_frames=17, height=256, width=256, fps=8.0, action_mode="policy", action_view_point=None,
    ),
}


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_prompt_ids_equal_reference_tokenize_prompt(pipeline, ours, case: str) -> None:
    kwargs = dict(PROMPT_CASES[case])
    kwargs.setdefault("use_system_prompt", True)
    expected = pipeline.tokenize_prompt(**kwargs)
    prompt, negative_prompt = kwargs.pop("prompt"), kwargs.pop("negative_prompt", None)
    kwargs["view_point"] = kwargs.pop("action_view_point", "ego_view")
    got = build_prompt_pair(ours, prompt, negative_prompt, **kwargs)
    assert got == expected
    eos, vision_start = ours.eos_token_id, ours.token_id("<|vision_start|>")
    assert got[0][-2:] == [eos, vision_start] and got[1][-2:] == [eos, vision_start]
    assert build_prompt_ids(ours, negative_prompt or "", negative=True, **kwargs) == expected[1]


def test_action_caption_matches_reference() -> None:
    for description, view_point, frames, fps, height, width in [
        ("pick up the cup", "ego_view", 17, 16.0, 480, 640),
        ("Open it?", None, 9, 24.0, 832, 480),
        ("", "wrist_view", 61, 30.0, 960, 960),
        ("Go.", "concat_view", 3601, 30.0, 704, 1280),
        ("caf\u00e9 \u201cquoted\u201d", "third_person_view", 25, 12.5, 720, 1280),
    ]:
        expected = Cosmos3OmniPipeline._build_action_json_prompt(
            description, view_point=view_point, num_frames=frames, fps=fps, height=height, width=width
        )
        assert action_caption(
            description, view_point=view_point, num_frames=frames, fps=fps, height=height, width=width
        ) == expected
    caption = json.loads(action_caption("stack", view_point="ego_view", num_frames=9, fps=24.0, height=480, width=640))
    assert list(caption) == ["cinematography", "actions", "duration", "fps", "resolution", "aspect_ratio"]
    assert caption["actions"] == [{"time": "0:00-0:00", "description": "stack."}] and caption["duration"] == "0s"
    assert caption["aspect_ratio"] == "4,3"


def test_tables_equal_reference() -> None:
    assert dict(EMBODIMENT_DOMAINS) == reference._EMBODIMENT_TO_DOMAIN_ID
    assert dict(RAW_ACTION_DIM) == reference._EMBODIMENT_TO_RAW_ACTION_DIM
    assert dict(VIEWPOINT_SENTENCES) == reference._ACTION_VIEWPOINT_TEMPLATES
    assert SYSTEM_PROMPT_IMAGE == reference._SYSTEM_PROMPT_IMAGE
    assert SYSTEM_PROMPT_VIDEO == reference._SYSTEM_PROMPT_VIDEO
    assert sorted(ACTION_RESOLUTION_BINS) == sorted(int(k) for k in reference._ACTION_RESOLUTION_BINS)
    for tier, bins in ACTION_RESOLUTION_BINS.items():
        ref_bins = reference._ACTION_RESOLUTION_BINS[str(tier)]
        assert list(bins) == list(ref_bins.values())
        assert [h / w for h, w in bins] == [float(k) for k in ref_bins]


def test_bin_classification_equals_reference() -> None:
    sizes = [(480, 640), (640, 480), (720, 1280), (1280, 720), (256, 256), (480, 848), (1080, 1920), (300, 400),
             (900, 1000), (96, 160), (544, 736), (600, 500), (13, 1000), (1000, 13), (352, 640)]
    for tier in ACTION_RESOLUTION_BINS:
        for height, width in sizes:
            expected = VideoProcessor.classify_height_width_bin(
                height, width, ratios=reference._ACTION_RESOLUTION_BINS[str(tier)]
            )
            assert classify_resolution_bin(height, width, tier) == expected, (tier, height, width)
    assert classify_resolution_bin(480, 640, 480) == (544, 736)
    assert classify_resolution_bin(720, 1280, 720) == (720, 1280)


def test_chat_template_jinja_file_takes_priority(tokenizer_dir, tmp_path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    (tmp_path / "chat_template.jinja").write_text(template)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert expected == "[user]hi>"
    assert ChatTokenizer.from_dir(tmp_path).render_chat(messages, add_generation_prompt=True) == expected


def test_bad_inputs_raise_clear_errors(tokenizer_dir, tmp_path, ours) -> None:
    geometry = dict(num_frames=17, height=64, width=96, fps=16.0)
    with pytest.raises(ValueError, match="unknown embodiment domain 'mars_rover'"):
        raw_action_dim("mars_rover")
    with pytest.raises(ValueError, match="'libero' has no fixed action width"):
        raw_action_dim("libero")
    assert raw_action_dim("hand_pose") == 57 and raw_action_dim("pusht") == 2
    with pytest.raises(ValueError, match="unknown view point 'top_view'"):
        build_prompt_ids(ours, "x", action_mode="policy", view_point="top_view", **geometry)
    with pytest.raises(ValueError, match="unknown action mode 'planning'"):
        build_prompt_ids(ours, "x", action_mode="planning", **geometry)
    with pytest.raises(ValueError, match="fps"):
        build_prompt_ids(ours, "x", num_frames=17, height=64, width=96, fps=0.0)
    with pytest.raises(ValueError, match="num_frames"):
        build_prompt_ids(ours, "x", num_frames=0, height=64, width=96, fps=16.0)
    with pytest.raises(ValueError, match="resolution tier 360"):
        classify_resolution_bin(480, 640, 360)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChatTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="no chat template"):
        ChatTokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        ours.token_id("<|not_a_token|>")

"""The embedded demo checkpoint: Hub folder layout with the keys diffusers' modules use; the demo run itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer, UniPCMultistepScheduler
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer
from transformers import AutoTokenizer

from cosmos_jax.demo import build_demo_checkpoint, is_demo_checkpoint, run_demo


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint")


@pytest.mark.parametrize("component, module", [
    ("transformer", Cosmos3OmniTransformer),
    ("vae", AutoencoderKLWan),
    ("sound_tokenizer", Cosmos3AVAEAudioTokenizer),
])
def test_demo_components_have_the_diffusers_keys_and_shapes(checkpoint, component, module):
    with open(checkpoint / component / "config.json") as f:
        config = json.load(f)
    assert config["_class_name"] == module.__name__
    reference = module.from_config(config).state_dict()
    stored = safetensors.numpy.load_file(checkpoint / component / "diffusion_pytorch_model.safetensors")
    assert set(stored) == set(reference)
    assert {k: tuple(v.shape) for k, v in stored.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_demo_folder_is_a_hub_pipeline_folder(checkpoint):
    with open(checkpoint / "model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"] == "Cosmos3OmniPipeline"
    assert {"transformer", "vae", "scheduler", "text_tokenizer", "sound_tokenizer"} <= set(index)
    scheduler = UniPCMultistepScheduler.from_pretrained(checkpoint / "scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [995, 973, 798, 128]  # the converter's Karras schedule
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "text_tokenizer")
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") is not None
    assert is_demo_checkpoint(checkpoint)
    stamp = (checkpoint / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    build_demo_checkpoint(checkpoint)  # cached: not rewritten
    assert (checkpoint / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_demo_run_writes_video_actions_and_report(tmp_path, checkpoint):
    report = run_demo(tmp_path, checkpoint, steps=2, progress=False)
    assert "RANDOM weights" in report["model"]
    modes = {run["mode"]: run for run in report["runs"]}
    assert set(modes) == {"text2video", "policy"}
    assert modes["text2video"]["video_shape"] == [9, 64, 64, 3]
    assert modes["policy"]["actions_shape"] == [8, 10]
    for run in report["runs"]:
        for path in run["files"]:
            assert (tmp_path / path.split("/")[-1]).stat().st_size > 0
    actions = np.load(tmp_path / "policy.actions.npy")
    assert actions.shape == (8, 10) and np.all(np.isfinite(actions))
    assert json.loads((tmp_path / "report.json").read_text())["runs"][1]["mode"] == "policy"

"""End-to-end parity of `Cosmos3Pipeline` with diffusers' `Cosmos3OmniPipeline`, plus bad-input errors.

A tiny random reference pipeline (transformer with perturbed norms/biases, a tiny residual Wan VAE with z_dim 48,
the converter's Karras UniPC scheduler, the tiny Qwen-style tokenizer, a tiny sound tokenizer) is saved with
`save_pretrained`; the JAX pipeline is built from the saved files. Both run fp32 from the same starting latents
(the reference's own `prepare_latents`, which already hold the clean conditioning frames) for 2 steps.
Tolerances (fp32): final latents, actions and sound latents within 1e-4 abs; decoded frames within 1e-4 abs;
the JAX-encoded clean conditioning frames within 1e-4 abs of the reference's.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipeline, CosmosActionCondition
from PIL import Image
from torch_reference import NANO_STYLE, build_torch_transformer
from transformers import AutoTokenizer

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.keymap_audio import audio_params_from_torch_state
from cosmos_jax.convert.keymap_transformer import params_from_torch_state
from cosmos_jax.convert.keymap_vae import vae_params_from_torch_state
from cosmos_jax.modeling.audio_tokenizer import AudioTokenizer, AudioTokenizerConfig
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.modeling.wan_vae import COSMOS3_LATENTS_MEAN, COSMOS3_LATENTS_STD, WanVAE, WanVAEConfig
from cosmos_jax.sampling.batch import sample_key
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.sampling.prompts import ChatTokenizer
from cosmos_jax.scheduler_config import SchedulerConfig
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer

ATOL = 1e-4
STEPS = 2
TRANSFORMER = dict(NANO_STYLE, vocab_size=600, action_dim=16, sound_dim=64)
VAE = dict(
    base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
    in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=list(COSMOS3_LATENTS_MEAN), latents_std=list(COSMOS3_LATENTS_STD),
)
SOUND = dict(dec_dim=4, enc_dim=8)
PROMPT = "A robot arm picks up a red cube from the wooden table"


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.3, 1.0, height)[:, None, None]
    noise = rng.integers(0, 60, (height, width, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


def _perturb_vae(vae: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pipeline")
    tok_dir = root / "tok"
    write_tiny_tokenizer(tok_dir)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE).eval()
    _perturb_vae(vae)
    torch.manual_seed(1)
    sound = Cosmos3AVAEAudioTokenizer(**SOUND).eval()
    pipe = Cosmos3OmniPipeline(
        transformer=build_torch_transformer(TRANSFORMER, seed=2),
        text_tokenizer=AutoTokenizer.from_pretrained(str(tok_dir)),
        vae=vae,
        scheduler=UniPCMultistepScheduler(
            use_karras_sigmas=True, use_flow_sigmas=True, prediction_type="flow_prediction",
            sigma_max=200.0, sigma_min=0.147,
        ),
        sound_tokenizer=sound,
        enable_safety_checker=False,
    )
    out = root / "pipeline"
    pipe.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def reference(folder):
    return Cosmos3OmniPipeline.from_pretrained(str(folder), enable_safety_checker=False)


def _read_state(directory) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            state.update(safetensors.numpy.load_file(os.path.join(directory, name)))
    return state


@pytest.fixture(scope="module")
def pipeline(folder):
    with open(folder / "transformer" / "config.json") as f:
        config = Cosmos3Config.from_dict(json.load(f))
    model = Cosmos3Transformer(config, dtype=jnp.float32, attention="xla")
    params = params_from_torch_state(_read_state(folder / "transformer"), config, model.abstract_params())
    with open(folder / "vae" / "config.json") as f:
        vae_config = WanVAEConfig.from_dict(json.load(f))
    vae_params = vae_params_from_torch_state(_read_state(folder / "vae"), vae_config)
    sound_config = AudioTokenizerConfig.from_json_file(folder / "sound_tokenizer" / "config.json")
    sound_params = audio_params_from_torch_state(_read_state(folder / "sound_tokenizer"), sound_config)
    return Cosmos3Pipeline(
        model, params, ChatTokenizer.from_dir(folder / "text_tokenizer"),
        SchedulerConfig.from_json_file(folder / "scheduler"),
        vae=WanVAE(vae_config), vae_params=vae_params,
        sound=AudioTokenizer(sound_config), sound_params=sound_params,
    )


# name -> JAX call kwargs (+ guidance). Every case compares the final latents (and actions / sound);
# "decode" also compares the decoded frames, "encode" also the JAX pipeline's own clean conditioning frames.
# Video cases share one latent shape (T=3, 2x2) so the VAE compiles once; the rest is marked slow (JAX
# compiles dominate: ~10-25 s per new shape on this 2-core CPU).
ACTION = dict(domain="av", resolution_tier=256, chunk=8)
CASES = {
    "text2image": dict(num_frames=1, height=32, width=32, guidance=3.0, decode=True),
    "text2video_cfg": dict(num_frames=9, height=32, width=32, guidance=4.0),
    "policy": dict(ACTION, action_mode="policy", guidance=1.0, image=(32, 32)),
}
SLOW_CASES = {
    "text2video_cfg_decoded": dict(num_frames=9, height=32, width=32, guidance=4.0, decode=True),
    "image2video": dict(num_frames=9, height=32, width=32, guidance=2.0, image=(40, 56), decode=True,
                        encode=True),
    "video2video": dict(num_frames=9, height=32, width=32, guidance=1.0, video=(36, 40, 6), decode=True,
                        encode=True),
    "policy_decoded": dict(ACTION, action_mode="policy", guidance=1.0, image=(32, 32), decode=True, encode=True),
    "forward_dynamics": dict(ACTION, action_mode="forward_dynamics", guidance=1.0, image=(32, 32), actions=(5, 9),
                             decode=True, encode=True),
    "inverse_dynamics": dict(ACTION, action_mode="inverse_dynamics", guidance=2.0, video=(32, 32, 7), decode=True,
                             encode=True),
    "text2video_sound": dict(num_frames=9, height=32, width=32, guidance=3.0, enable_sound=True, decode=True),
}
PARAMS = [pytest.param(n, CASES[n], id=n) for n in CASES] + [
    pytest.param(n, SLOW_CASES[n], id=n, marks=pytest.mark.slow) for n in SLOW_CASES
]


def _materialise(case: dict) -> dict:
    """Replace the media/action placeholders of a case by PIL images / arrays."""
    kwargs = dict(case)
    if isinstance(kwargs.get("image"), tuple):
        h, w = kwargs["image"]
        kwargs["image"] = _image(h, w, seed=3)
    if "video" in kwargs:
        h, w, n = kwargs["video"]
        kwargs["video"] = [_image(h, w, seed=10 + i) for i in range(n)]
    if "actions" in kwargs:
        kwargs["actions"] = np.random.default_rng(4).standard_normal(kwargs["actions"]).astype(np.float32)
    return kwargs


def _reference_run(reference, kwargs: dict, decode: bool, seed: int = 0, prompt: str = PROMPT) -> dict:
    """prepare_latents (torch noise seeded with `seed`, clean frames encoded by the reference), then __call__ from
    them with `prompt`."""
    action = None
    if "action_mode" in kwargs:
        raw = kwargs.get("actions")
        action = CosmosActionCondition(
            mode=kwargs["action_mode"], chunk_size=kwargs["chunk"], domain_name=kwargs["domain"],
            resolution_tier=kwargs["resolution_tier"], raw_actions=None if raw is None else torch.from_numpy(raw),
            image=kwargs.get("image"), video=kwargs.get("video"),
        )
        num_frames, height, width = kwargs["chunk"] + 1, None, None
        image = video = None
    else:
        num_frames, height, width = kwargs["num_frames"], kwargs["height"], kwargs["width"]
        image, video = kwargs.get("image"), kwargs.get("video")
    sound = kwargs.get("enable_sound", False)
    with torch.no_grad():
        start = reference.prepare_latents(
            image=image, video=video, num_frames=num_frames, height=height, width=width, fps=24.0,
            generator=torch.Generator().manual_seed(seed), device="cpu", dtype=torch.float32, enable_sound=sound,
            action=action,
        )
    vision0, sound0, action0 = start[0], start[1], start[2]
    captured = {}

    def on_step(pipe, i, t, tensors):
        captured["latents"] = tensors["latents"].clone()
        return {}

    original_decode = reference.decode_sound

    def decode_sound(latent):
        captured["sound_latents"] = latent.clone()
        return original_decode(latent)

    reference.decode_sound = decode_sound
    try:
        out = reference(
            prompt, image=image, video=video, action=action,
            num_frames=None if action else num_frames, height=height, width=width, fps=24.0,
            num_inference_steps=STEPS, guidance_scale=kwargs["guidance"], enable_sound=sound,
            latents=vision0, sound_latents=sound0, action_latents=action0,
            output_type="np" if decode else "latent", callback_on_step_end=on_step, enable_safety_check=False,
        )
    finally:
        del reference.decode_sound
    return {
        "start": [None if x is None else x.numpy() for x in (vision0, sound0, action0)],
        "latents": captured["latents"].numpy(),
        "video": np.asarray(out.video) if decode else None,
        "sound_latents": captured.get("sound_latents", torch.zeros(0)).numpy() if sound else None,
        "sound": None if out.sound is None else out.sound.float().numpy(),
        "actions": None if not out.action else out.action[0].float().numpy(),
    }


@pytest.mark.parametrize("name, case", PARAMS)
def test_pipeline_matches_reference(reference, pipeline, name, case):
    kwargs = _materialise(case)
    decode, encode = kwargs.pop("decode", False), kwargs.pop("encode", False)
    guidance = kwargs.pop("guidance")
    ref = _reference_run(reference, dict(kwargs, guidance=guidance), decode)
    vision0, sound0, action0 = ref["start"]

    if encode:  # the JAX pipeline's own conditioning (preprocessing + VAE encoding) gives the same clean frames
        prep = pipeline.prepare(GenerationRequest(PROMPT, **kwargs, guidance=guidance))
        own_vision, _, own_action = pipeline.starting_latents(prep, sample_key(0, 0), (None, None, None))
        assert own_vision.shape == vision0.shape and prep.clean_frames
        for frame in prep.clean_frames:
            np.testing.assert_allclose(own_vision[:, :, frame], vision0[:, :, frame], atol=ATOL, rtol=0)
        if prep.clean_action_rows:
            np.testing.assert_array_equal(own_action, action0)

    result = pipeline(GenerationRequest(
        PROMPT, **kwargs, fps=24.0, steps=STEPS, guidance=guidance, init_noise=vision0,
        init_sound_noise=sound0, init_action_noise=action0, output_type="video" if decode else "latent",
    ), progress=False)
    np.testing.assert_allclose(result.latents, ref["latents"], atol=ATOL, rtol=0)
    if decode:
        assert result.video.shape == ref["video"].shape
        np.testing.assert_allclose(result.video, ref["video"], atol=ATOL, rtol=0)
    else:
        assert result.video is None
    if ref["actions"] is not None:
        assert result.actions.shape == ref["actions"].shape
        np.testing.assert_allclose(result.actions, ref["actions"], atol=ATOL, rtol=0)
    else:
        assert result.actions is None
    if kwargs.get("enable_sound"):
        np.testing.assert_allclose(result.sound_latents, ref["sound_latents"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(result.sound, ref["sound"], atol=ATOL, rtol=0)
    # the run did something: the final latents moved away from the start at noisy frames
    assert np.abs(result.latents - vision0).max() > 1e-2 or name == "inverse_dynamics"


# ----------------------------------------------------------------------------------------------- bad inputs

BAD_INPUTS = {
    "unknown domain": (dict(action_mode="policy", domain="mars_rover", chunk=8, image=(32, 32)),
                       ValueError, "unknown embodiment domain 'mars_rover'"),
    "action width": (dict(action_mode="forward_dynamics", domain="av", chunk=8, image=(32, 32), actions=(4, 7)),
                     ValueError, "actions have 7 channels but domain 'av' needs 9"),
    "frames not 1+4k": (dict(num_frames=8, height=32, width=32), ValueError, "num_frames must be 1 \\+ 4k"),
    "height not /16": (dict(num_frames=9, height=40, width=32), ValueError, "multiples of 16, got 40x32"),
    "image and video": (dict(num_frames=9, height=32, width=32, image=(32, 32), video=(32, 32, 3)),
                        ValueError, "either image .* or video, not both"),
    "missing image file": (dict(num_frames=9, height=32, width=32, image="/nonexistent/first_frame.png"),
                           FileNotFoundError, "image file not found: /nonexistent/first_frame.png"),
    "guidance < 1": (dict(num_frames=9, height=32, width=32, guidance=0.5), ValueError, "guidance must be .* >= 1"),
    "chunk not /4": (dict(action_mode="policy", domain="av", chunk=6, image=(32, 32)), ValueError,
                     "chunk must be a positive multiple of 4"),
    "action frames given": (dict(action_mode="policy", domain="av", chunk=8, image=(32, 32), num_frames=9),
                            ValueError, "leave them unset"),
    "inverse without video": (dict(action_mode="inverse_dynamics", domain="av", chunk=8, image=(32, 32)),
                              ValueError, "inverse_dynamics needs a conditioning video"),
    "domain too wide": (dict(action_mode="policy", domain="hand_pose", chunk=8, image=(32, 32)), ValueError,
                        "has id 3.*|57 action channels"),
    "init noise shape": (dict(num_frames=9, height=32, width=32, init_noise=np.zeros((1, 48, 2, 2, 2))),
                         ValueError, "init_noise must have shape \\[1, 48, 3, 2, 2\\]"),
    "sound noise without sound": (dict(num_frames=9, height=32, width=32, init_sound_noise=np.zeros((64, 10))),
                                  ValueError, "init_sound_noise was given but this request has no such modality"),
    "bad output type": (dict(num_frames=9, height=32, width=32, output_type="gif"), ValueError, "output_type"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_refused_before_compute(pipeline, monkeypatch, name):
    kwargs, error, message = BAD_INPUTS[name]
    kwargs = _materialise(kwargs)

    def no_compute(*args, **kw):
        raise AssertionError("compute started before the input was checked")

    monkeypatch.setattr(pipeline, "starting_latents", no_compute)
    monkeypatch.setattr(pipeline, "_executable", no_compute)
    with pytest.raises(error, match=message):
        pipeline(GenerationRequest(PROMPT, steps=STEPS, output_type=kwargs.pop("output_type", "latent"), **kwargs),
                 progress=False)


def test_video_output_needs_a_vae(pipeline):
    bare = Cosmos3Pipeline(pipeline.model, pipeline.params, pipeline.tokenizer, pipeline.scheduler_config)
    with pytest.raises(ValueError, match="output_type='video' needs a VAE"):
        bare(GenerationRequest(PROMPT, num_frames=9, height=32, width=32, steps=STEPS, output_type="video"))
    with pytest.raises(ValueError, match="image2video needs the VAE"):
        bare(GenerationRequest(PROMPT, num_frames=9, height=32, width=32, image=_image(32, 32, 0), steps=STEPS,
                               output_type="latent"))
    with pytest.raises(ValueError, match="enable_sound needs a sound tokenizer"):
        bare(GenerationRequest(PROMPT, num_frames=9, height=32, width=32, steps=STEPS, enable_sound=True,
                               output_type="latent"))


def test_cli_refuses_bad_paths(tmp_path, capsys):
    from cosmos_jax.cli import main

    missing = str(tmp_path / "no_model")
    assert main(["generate", "--model", missing, "--prompt", "x", "--output", str(tmp_path / "o.mp4")]) == 2
    assert f"error: --model: folder not found: {missing}" in capsys.readouterr().err
    model = tmp_path / "model"
    model.mkdir()
    args = ["generate", "--model", str(model), "--prompt", "x"]
    assert main(args + ["--image", str(tmp_path / "nope.png"), "--output", str(tmp_path / "o.mp4")]) == 2
    assert "error: --image: file not found" in capsys.readouterr().err
    assert main(args + ["--output-type", "latent", "--output", str(tmp_path / "o.mp4")]) == 2
    assert "use a .npy path" in capsys.readouterr().err
    assert main(args + ["--num-frames", "1", "--output", str(tmp_path / "o.mp4")]) == 2
    assert "one frame is written as .png" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_policy_writes_actions_like_the_pipeline(folder, pipeline, tmp_path):
    """`cosmos-jax generate` on the saved Hub folder (loaded by cosmos_jax.convert.load) with injected starting latents:
    the written latents/actions equal a direct pipeline call; the action json/png are written."""
    from cosmos_jax.cli import main

    rng = np.random.default_rng(5)
    noise = {"vision": rng.standard_normal((1, 48, 3, 2, 2)), "action": rng.standard_normal((8, 16))}
    for name, array in noise.items():
        np.save(tmp_path / f"{name}.npy", array.astype(np.float32))
    image = tmp_path / "first.png"
    _image(32, 32, 3).save(image)
    out = tmp_path / "out" / "policy.npy"
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--image", str(image),
                 "--action-mode", "policy", "--domain", "av", "--chunk", "8", "--resolution-tier", "256",
                 "--steps", str(STEPS), "--init-noise", str(tmp_path / "vision.npy"),
                 "--init-action-noise", str(tmp_path / "action.npy"), "--output-type", "latent",
                 "--output", str(out), "--dtype", "float32", "--attention", "xla", "--no-progress"])
    assert code == 0
    direct = pipeline(GenerationRequest(PROMPT, image=str(image), action_mode="policy", domain="av", chunk=8,
                                        resolution_tier=256, steps=STEPS, guidance=1.0, init_noise=noise["vision"],
                                        init_action_noise=noise["action"], output_type="latent"), progress=False)
    np.testing.assert_allclose(np.load(out), direct.latents, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "policy.actions.npy"), direct.actions, atol=1e-6, rtol=0)
    with open(tmp_path / "out" / "policy.actions.json") as f:
        written = json.load(f)
    assert written["mode"] == "policy" and written["shape"] == [8, 9]
    assert Image.open(tmp_path / "out" / "policy.actions.png").size == (800, 480)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "policy.actions.json", "policy.actions.npy", "policy.actions.png", "policy.npy"]

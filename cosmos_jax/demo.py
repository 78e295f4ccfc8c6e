"""The embedded demo: a tiny random Cosmos 3 checkpoint in the published Hub folder layout, and a run of it.

`build_demo_checkpoint` writes (once; reused when present) a diffusers-style pipeline folder:
    model_index.json, transformer/ (configs/tiny.json, random JAX init, Hub key names, bf16 safetensors),
    vae/ (a tiny residual Wan VAE, z_dim 48), sound_tokenizer/ (a tiny AVAE), scheduler/ (the converter's UniPC
    config), text_tokenizer/ (the tiny Qwen-style tokenizer).
`run_demo` loads it through `Cosmos3Pipeline.from_pretrained` (the same path as a real model) and runs
text→video and an action policy, writing an mp4 per run, an action plot and a JSON report.
The weights are random: the outputs are noise-like and show that the pipeline runs, not what Cosmos 3 makes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from PIL import Image

from cosmos_jax.config import load_preset
from cosmos_jax.convert.keymap_audio import audio_state_from_params
from cosmos_jax.convert.keymap_transformer import torch_state_from_params
from cosmos_jax.convert.keymap_vae import vae_state_from_params
from cosmos_jax.convert.safetensors_io import write_checkpoint
from cosmos_jax.modeling.audio_tokenizer import AudioTokenizerConfig, parameter_shapes
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.modeling.wan_vae import WanVAEConfig, init_params
from cosmos_jax.sampling import media
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.scheduler_config import SchedulerConfig
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer

DEMO_VERSION = 1
MARKER = "cosmos_jax_demo.json"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cosmos-jax" / "demo"
SEED = 0
TINY_VAE = dict(base_dim=8, decoder_base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
TINY_SOUND = dict(dec_dim=4, enc_dim=8)
MODEL_DESCRIPTION = (
    "the embedded tiny demo checkpoint: configs/tiny.json transformer (2 layers, hidden 64) with RANDOM weights "
    f"(seed {SEED}), a tiny random Wan VAE and sound tokenizer; NOT a trained Cosmos 3 model, outputs are noise-like"
)
_MAX_SHARD_BYTES = 5 * 1024**3


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _to_bf16(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16) for k, v in state.items()}


def _write_component(folder: Path, config: dict[str, Any], state: dict[str, np.ndarray]) -> None:
    write_checkpoint(folder, state, max_shard_bytes=_MAX_SHARD_BYTES, overwrite=True)
    _write_json(folder / "config.json", config)


def _random_params(abstract: Any, seed: int) -> Any:
    """Random numpy parameters for an abstract tree (no compile): kernels N(0, 1/fan_in), norm scales and
    weight-norm magnitudes 1, biases and Snake exponents 0."""
    rng = np.random.default_rng(seed)

    def fill(path: Any, leaf: Any) -> np.ndarray:
        name = path[-1].key
        if name in ("kernel", "kernel_v"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name in ("gamma", "scale", "kernel_g"):
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def is_demo_checkpoint(folder: str | os.PathLike) -> bool:
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text(encoding="utf-8")).get("version") == DEMO_VERSION


def build_demo_checkpoint(folder: str | os.PathLike) -> Path:
    """Write the tiny random checkpoint to `folder` (Hub layout) unless a current one is there already."""
    folder = Path(folder)
    if is_demo_checkpoint(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    keys = jax.random.split(jax.random.key(SEED), 2)

    config = load_preset("tiny")
    model = Cosmos3Transformer(config, dtype=jnp.float32)
    params = jax.jit(model.init)(keys[0])
    state = _to_bf16(torch_state_from_params(jax.device_get(params), config))
    _write_component(folder / "transformer", {**config.to_dict(), "_diffusers_version": "0.42.1"}, state)

    vae_config = WanVAEConfig(**TINY_VAE)
    vae_abstract = jax.eval_shape(lambda key: init_params(vae_config, key), keys[1])
    vae_state = vae_state_from_params(_random_params(vae_abstract, SEED + 1), vae_config)
    _write_component(folder / "vae", {"_class_name": "AutoencoderKLWan", **vae_config.to_dict()}, vae_state)

    sound_config = AudioTokenizerConfig(**TINY_SOUND)
    sound_abstract = parameter_shapes(sound_config)
    sound_state = audio_state_from_params(_random_params(sound_abstract, SEED + 2), sound_config)
    _write_component(folder / "sound_tokenizer", {"_class_name": "Cosmos3AVAEAudioTokenizer",
                                                  **sound_config.to_dict()}, sound_state)

    (folder / "scheduler").mkdir(exist_ok=True)
    SchedulerConfig.cosmos3().to_json_file(folder / "scheduler" / "scheduler_config.json")
    write_tiny_tokenizer(folder / "text_tokenizer")
    _write_json(folder / "model_index.json", {
        "_class_name": "Cosmos3OmniPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "Cosmos3OmniTransformer"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "sound_tokenizer": ["diffusers", "Cosmos3AVAEAudioTokenizer"],
        "safety_checker": [None, None],
        "enable_safety_checker": False,
        "default_use_system_prompt": True,
        "use_native_flow_schedule": False,
    })
    _write_json(folder / MARKER, {"version": DEMO_VERSION, "seed": SEED, "description": MODEL_DESCRIPTION})
    return folder


def demo_image(height: int = 64, width: int = 64) -> Image.Image:
    """A synthetic first frame: colour ramps with a dark square (an 'object' on a 'table')."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                      np.full_like(x, 128)], axis=-1).astype(np.uint8)
    image[height // 3 : height // 2, width // 3 : width // 2] = (30, 30, 30)
    return Image.fromarray(image)


def run_demo(out_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *, steps: int = 4,
             progress: bool = True) -> dict[str, Any]:
    """Build/load the demo checkpoint and run text→video and policy; returns the report (also written)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(checkpoint) if checkpoint is not None else out_dir / "checkpoint"
    start = time.perf_counter()
    build_demo_checkpoint(checkpoint)
    built = time.perf_counter() - start
    start = time.perf_counter()
    pipeline = Cosmos3Pipeline.from_pretrained(checkpoint, dtype=jnp.float32, attention="xla")
    loaded = time.perf_counter() - start
    report: dict[str, Any] = {
        "model": MODEL_DESCRIPTION,
        "checkpoint": str(checkpoint),
        "checkpoint_seconds": round(built, 2),
        "load_seconds": round(loaded, 2),
        "runs": [],
    }

    t2v = pipeline(GenerationRequest("A robot arm picks up a red cube from the wooden table.", num_frames=9,
                                     height=64, width=64, fps=24.0, steps=steps, guidance=6.0, seed=SEED),
                   progress=progress)
    files = media.write_video_outputs(str(out_dir / "text2video"), t2v.video, t2v.fps)
    report["runs"].append(_run_entry("text2video", t2v, files, num_frames=9, height=64, width=64, guidance=6.0))

    policy = pipeline(GenerationRequest("Pick up the dark block.", image=demo_image(), action_mode="policy",
                                        domain="bridge_orig_lerobot", chunk=8, resolution_tier=256, steps=steps,
                                        guidance=1.0, seed=SEED), progress=progress)
    files = media.write_video_outputs(str(out_dir / "policy"), policy.video, policy.fps)
    files += media.write_actions(str(out_dir / "policy"), policy.actions, domain="bridge_orig_lerobot",
                                 mode="policy")
    report["runs"].append(_run_entry("policy", policy, files, chunk=8, domain="bridge_orig_lerobot", guidance=1.0))
    media.write_json(out_dir / "report.json", report)
    return report


def _run_entry(name: str, result: Any, files: list[str], **settings: Any) -> dict[str, Any]:
    entry = {
        "mode": name,
        "settings": settings,
        "latents_shape": list(result.latents.shape),
        "video_shape": list(result.video.shape),
        "timings_seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "files": files,
    }
    if result.actions is not None:
        entry["actions_shape"] = list(result.actions.shape)
    return entry

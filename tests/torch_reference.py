"""Test helpers: tiny diffusers Cosmos3OmniTransformer models and reference forwards built the pipeline's way."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from diffusers import Cosmos3OmniTransformer
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipeline

from cosmos_jax.config import Cosmos3Config

NANO_STYLE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, rope_axes_dim=[6, 5, 5], vocab_size=300, hidden_act="silu", rms_norm_eps=1e-6,
    qk_norm_for_text=True, use_und_k_norm_for_gen=False, rope_theta=5_000_000.0,
    action_gen=True, action_dim=16, num_embodiment_domains=4, sound_gen=True, sound_dim=8,
)
EDGE_STYLE = dict(
    NANO_STYLE, hidden_act="relu2", rms_norm_eps=1e-5, qk_norm_for_text=False, use_und_k_norm_for_gen=True,
    rope_theta=100_000_000.0, sound_gen=False, sound_dim=None, num_attention_heads=8, num_key_value_heads=2,
)


def build_torch_transformer(config: dict[str, Any], seed: int = 0) -> Cosmos3OmniTransformer:
    """A random tiny reference model with every norm weight, bias and modality embedding perturbed (default
    init leaves norms at 1 and biases at 0, which would hide bugs)."""
    torch.manual_seed(seed)
    model = Cosmos3OmniTransformer(**config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner = name.split(".")[-2] if "." in name else ""
            if "norm" in owner:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias") or "modality_embed" in name or name.endswith("bias.weight"):
                param.copy_(0.2 * torch.randn_like(param))
            elif name.startswith("embed_tokens"):
                param.copy_(torch.randn_like(param))
            elif "fc.weight" in name:
                param.copy_(0.2 * torch.randn_like(param))
    return model


def save_and_read_state(model: torch.nn.Module, folder: str) -> dict[str, np.ndarray]:
    """save_pretrained to `folder` (safetensors, as the Hub does) and read the tensors back with numpy."""
    model.save_pretrained(folder, safe_serialization=True)
    return safetensors.numpy.load_file(f"{folder}/diffusion_pytorch_model.safetensors")


def jax_config(model: Cosmos3OmniTransformer) -> Cosmos3Config:
    return Cosmos3Config.from_dict(dict(model.config))


def pipeline_stub(model: Cosmos3OmniTransformer) -> Any:
    """An object the pipeline's `_prepare_*_segment` methods accept as `self`."""
    return types.SimpleNamespace(transformer=model, vae_scale_factor_temporal=4)


def reference_segments(
    model: Cosmos3OmniTransformer,
    und_len: int,
    latent_shape: tuple[int, int, int],
    fps: float,
    clean_frames: list[int],
    sound_len: int = 0,
    action_len: int = 0,
    clean_action_rows: list[int] | None = None,
) -> dict[str, Any]:
    """The static packed fields exactly as the pipeline computes them (its own methods)."""
    stub = pipeline_stub(model)
    text = Cosmos3OmniPipeline._prepare_text_segment(stub, list(range(und_len)), "cpu")
    t, h, w = latent_shape
    dummy_latents = torch.zeros(1, model.config.latent_channel, t, h, w)
    vision = Cosmos3OmniPipeline._prepare_vision_segment(
        stub, dummy_latents, bool(clean_frames), text["vision_start_temporal_offset"], fps, text["und_len"], "cpu",
        condition_frame_indexes=clean_frames,
    )
    segments = {**text, **vision}
    mrope = [text["text_mrope_ids"], vision["vision_mrope_ids"]]
    curr = text["und_len"] + vision["num_vision_tokens"]
    if sound_len:
        sound = Cosmos3OmniPipeline._prepare_sound_segment(
            stub, torch.zeros(model.config.sound_dim, sound_len), text["vision_start_temporal_offset"],
            model.config.sound_latent_fps, curr, "cpu",
        )
        segments.update(sound)
        mrope.append(sound["sound_mrope_ids"])
        curr += sound_len
    if action_len:
        action = Cosmos3OmniPipeline._prepare_action_segment(
            stub, torch.zeros(action_len, model.config.action_dim), clean_action_rows or [],
            text["vision_start_temporal_offset"], fps, curr, "cpu",
        )
        segments.update(action)
        mrope.append(action["action_mrope_ids"])
        curr += action_len
    segments["position_ids"] = torch.cat(mrope, dim=1)
    segments["sequence_length"] = curr
    return segments


def reference_forward(
    model: Cosmos3OmniTransformer,
    segments: dict[str, Any],
    input_ids: np.ndarray,
    latents: np.ndarray,
    timestep: int,
    sound: np.ndarray | None = None,
    action: np.ndarray | None = None,
    domain: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One transformer call as the pipeline's denoising loop makes it; returns float32 numpy velocities."""
    n_vision = len(segments["vision_mse_loss_indexes"])
    kwargs: dict[str, Any] = dict(
        input_ids=torch.as_tensor(input_ids, dtype=torch.long),
        text_indexes=segments["text_indexes"],
        position_ids=segments["position_ids"],
        und_len=segments["und_len"],
        sequence_length=segments["sequence_length"],
        vision_tokens=[torch.as_tensor(latents).to(dtype)],
        vision_token_shapes=segments["vision_token_shapes"],
        vision_sequence_indexes=segments["vision_sequence_indexes"],
        vision_mse_loss_indexes=segments["vision_mse_loss_indexes"],
        vision_timesteps=torch.full((n_vision,), timestep),
        vision_noisy_frame_indexes=segments["vision_noisy_frame_indexes"],
        return_dict=False,
    )
    if sound is not None:
        kwargs.update(
            sound_tokens=[torch.as_tensor(sound).to(dtype)],
            sound_token_shapes=segments["sound_token_shapes"],
            sound_sequence_indexes=segments["sound_sequence_indexes"],
            sound_mse_loss_indexes=segments["sound_mse_loss_indexes"],
            sound_timesteps=torch.full((segments["sound_len"],), timestep),
            sound_noisy_frame_indexes=segments["sound_noisy_frame_indexes"],
        )
    if action is not None:
        kwargs.update(
            action_tokens=[torch.as_tensor(action).to(dtype)],
            action_token_shapes=segments["action_token_shapes"],
            action_sequence_indexes=segments["action_sequence_indexes"],
            action_mse_loss_indexes=segments["action_mse_loss_indexes"],
            action_timesteps=torch.full((segments["num_noisy_action_tokens"],), timestep),
            action_noisy_frame_indexes=segments["action_noisy_frame_indexes"],
            action_domain_ids=[torch.tensor(domain)],
        )
    with torch.no_grad():
        vision_out, sound_out, action_out = model(**kwargs)
    as_np = lambda x: None if x is None else x[0].float().numpy()  # noqa: E731
    return as_np(vision_out), as_np(sound_out), as_np(action_out)

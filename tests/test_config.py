"""Config: reference keys round-trip unchanged, validation names the bad key, presets give the published sizes."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import pytest

from cosmos_jax.config import ConfigError, Cosmos3Config, load_preset
from cosmos_jax.modeling.transformer import Cosmos3Transformer

# Spec §1.1: generator-transformer parameters (both towers, as the diffusers checkpoint holds them).
PUBLISHED_COUNTS = {"nano": 15_173_669_120, "super": 64_019_736_832, "edge": 3_369_657_024}

# The published Nano transformer/config.json (spec §1.1 note b), with keys diffusers 0.42.1 ignores.
NANO_PUBLISHED = {
    "_class_name": "Cosmos3OmniTransformer", "_diffusers_version": "0.37.1", "action_dim": 64, "action_gen": True,
    "attention_bias": False, "attention_dropout": 0.0, "base_fps": 24, "enable_fps_modulation": True,
    "freeze_und": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "joint_attn_implementation": "two_way", "latent_channel": 48,
    "latent_patch_size": 2, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
    "num_attention_heads": 32, "num_embodiment_domains": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "patch_latent_dim": 192, "position_embedding_type": "unified_3d_mrope", "qk_norm": False,
    "qk_norm_for_diffusion": True, "qk_norm_for_text": True, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
    "rope_theta": 5000000, "sound_dim": 64, "sound_gen": True, "sound_latent_fps": 25,
    "temporal_compression_factor_sound": 1, "timestep_scale": 0.001, "unified_3d_mrope_reset_spatial_ids": True,
    "unified_3d_mrope_temporal_modality_margin": 15000, "use_cache": True, "use_moe": True,
    "video_temporal_causal": False, "vocab_size": 151936,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_preset_parameter_counts_match_the_published_models(name):
    abstract = Cosmos3Transformer(load_preset(name)).abstract_params()
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == PUBLISHED_COUNTS[name]


def test_published_nano_config_round_trips_unchanged(tmp_path):
    cfg = Cosmos3Config.from_dict(NANO_PUBLISHED)
    assert cfg.rope_axes_dim == (24, 20, 20)
    assert cfg.extra["use_moe"] is True and cfg.norm_variant == "diffusers"
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert json.loads(path.read_text()) == NANO_PUBLISHED
    assert Cosmos3Config.from_json(path) == cfg and hash(Cosmos3Config.from_json(path)) == hash(cfg)


def test_edge_preset_uses_nemotron_norms_and_und_k_norm():
    cfg = load_preset("edge")
    assert cfg.norm_variant == "nemotron" and cfg.has_und_k_norm_for_gen and cfg.num_kv_groups == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_key_value_heads": 7}, "divisible by num_key_value_heads"),
        ({"rope_axes_dim": [24, 20, 21]}, "summing to head_dim/2 = 64"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu' or 'relu2'"),
        ({"action_dim": None}, "action_gen=True needs a positive action_dim"),
        ({"sound_dim": None}, "sound_gen=True needs a positive sound_dim"),
        ({"patch_latent_dim": 100}, "patch_latent_dim (100) must equal"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"_class_name": "WanTransformer3DModel"}, "expected _class_name"),
    ],
)
def test_validation_names_the_bad_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Cosmos3Config.from_dict({**NANO_PUBLISHED, **override})


def test_unreadable_config_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Cosmos3Config.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Cosmos3Config.from_json(bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("gigantic")


def test_a_changed_value_is_written_even_if_the_source_lacked_its_key():
    cfg = Cosmos3Config.from_dict(NANO_PUBLISHED)
    edited = Cosmos3Config.from_dict({**cfg.to_dict(), "use_und_k_norm_for_gen": True})
    replaced = dataclasses.replace(cfg, use_und_k_norm_for_gen=True, qk_norm_for_text=False)
    assert replaced.to_dict()["use_und_k_norm_for_gen"] is True
    assert Cosmos3Config.from_dict(replaced.to_dict()).has_und_k_norm_for_gen
    assert edited.to_dict()["use_und_k_norm_for_gen"] is True

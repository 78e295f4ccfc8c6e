"""The three RMSNorm roundings against the torch classes they stand for, bit for bit in bf16.

diffusers:  `diffusers.models.normalization.RMSNorm` (the Nano/Super transformer's norms),
nemotron:   `Cosmos3NemotronRMSNorm` (diffusers' Edge transformer),
llama:      transformers' `Cosmos3EdgeTextRMSNorm` / `Qwen3VLTextRMSNorm` (the reasoner language models, which the
            `cosmos-jax reason` path must follow: the reasoner config selects it for Edge and Omni alike).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3NemotronRMSNorm
from transformers.models.cosmos3_edge.modeling_cosmos3_edge import Cosmos3EdgeTextRMSNorm
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

from cosmos_jax.config import ConfigError, Cosmos3Config
from cosmos_jax.modeling.norms import apply_rms_scale, rms_normalize
from cosmos_jax.modeling.reasoner import ReasonerConfig

EPS = 1e-5
WIDTH = 256


def _torch_norm(variant: str) -> torch.nn.Module:
    if variant == "diffusers":
        return DiffusersRMSNorm(WIDTH, eps=EPS, elementwise_affine=True, bias=False)
    if variant == "nemotron":
        return Cosmos3NemotronRMSNorm(WIDTH, eps=EPS)
    return Cosmos3EdgeTextRMSNorm(WIDTH, eps=EPS) if variant == "llama" else Qwen3VLTextRMSNorm(WIDTH, eps=EPS)


@pytest.mark.parametrize("variant, torch_variant", [("diffusers", "diffusers"), ("nemotron", "nemotron"),
                                                    ("llama", "llama"), ("llama", "qwen3_vl")])
def test_bf16_rounding_is_bitwise_the_reference(variant, torch_variant):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, WIDTH)) * 3.0).astype(np.float32)
    weight = (1.0 + 0.3 * rng.standard_normal(WIDTH)).astype(np.float32)
    module = _torch_norm(torch_variant).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        expected = module(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    got = apply_rms_scale(x_bf16, rms_normalize(x_bf16, EPS), jnp.asarray(weight, jnp.bfloat16), variant)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), expected)


def test_the_variants_differ_in_bf16():
    """Edge's two references disagree in bf16 (nemotron scales in fp32 and rounds once, llama rounds twice):
    on this input a measurable share of the elements differ, so picking the right one matters."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((64, WIDTH)) * 3.0, jnp.bfloat16)
    scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(WIDTH), jnp.bfloat16)
    normed = rms_normalize(x, EPS)
    llama, nemotron = (np.asarray(apply_rms_scale(x, normed, scale, v).astype(jnp.float32))
                       for v in ("llama", "nemotron"))
    assert 0.05 < np.mean(llama != nemotron) < 0.6


def test_config_variant_selection():
    assert Cosmos3Config(hidden_act="relu2", qk_norm_for_text=False).norm_variant == "nemotron"
    assert Cosmos3Config().norm_variant == "diffusers"
    llama = Cosmos3Config(rms_norm_variant="llama")
    assert llama.norm_variant == "llama"
    assert llama != Cosmos3Config() and hash(llama) != hash(Cosmos3Config())
    assert "rms_norm_variant" not in llama.to_dict()  # not a diffusers config key
    with pytest.raises(ConfigError, match="rms_norm_variant must be .* got 'fp8'"):
        Cosmos3Config(rms_norm_variant="fp8")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                vocab_size=100, rope_parameters={"mrope_section": [4, 2, 2]})
    for model_type in ("cosmos3_omni", "cosmos3_edge"):
        config = ReasonerConfig.from_dict({"model_type": model_type, "text_config": text})
        assert config.text.norm_variant == "llama"

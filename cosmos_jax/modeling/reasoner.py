"""The reasoner model: its config, the language tower's layer loop with deepstack and a K/V cache, and the
vision encoder wiring. Decoding (prefill, the decode loop, sampling) is `cosmos_jax.sampling.reason`.

The language model is the reasoner tower of `Cosmos3Transformer` (same parameters, `TowerLayer.project/finish`),
run here with its own layer loop because it needs two things the two-tower forward does not: deepstack visual
features added after the first layers, and a K/V cache written one token at a time (docs/model.md, "The
reasoner on its own").

Batches are left-padded: row b of a prompt batch holds `pad[b]` pad tokens, then its prompt, so every row writes
its i-th new token at cache index P + i. A key is visible to a query iff it is not padding and not in the future.
The attention over the cache goes through the dispatch point (`cosmos_jax.modeling.attention`, `Reasoner.attention`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.attention import IMPLEMENTATIONS, cached_attention_function
from cosmos_jax.modeling.layers import TowerLayer, reasoner_layer, scan_layers
from cosmos_jax.modeling.rope import apply_rope, mrope_cos_sin
from cosmos_jax.modeling.towers import ReasonerIO
from cosmos_jax.modeling.vision import VisionConfig, VisionEncoder, VisionGrid

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ReasonerConfig:
    """The reasoner as described by the root config.json of a Cosmos 3 repository.

    text: the language tower as a `Cosmos3Config` (only its tower fields matter); vision: None for text-only use.
    """

    text: Cosmos3Config
    vision: VisionConfig | None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    max_position_embeddings: int = 262144
    model_type: str = "cosmos3_omni"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ReasonerConfig":
        """From config.json content (model_type cosmos3_omni, or cosmos3_edge for the text tower only)."""
        model_type = raw.get("model_type")
        if model_type not in ("cosmos3_omni", "cosmos3_edge"):
            raise ValueError(f"reasoner config.json must have model_type 'cosmos3_omni' or 'cosmos3_edge', "
                             f"got {model_type!r}")
        text = raw.get("text_config")
        if not isinstance(text, Mapping):
            raise ValueError("reasoner config.json has no text_config object")
        rope = text.get("rope_parameters") or {}
        edge = model_type == "cosmos3_edge"
        text_config = Cosmos3Config(
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            hidden_act=text.get("hidden_act", "relu2" if edge else "silu"),
            rms_norm_eps=text.get("rms_norm_eps", 1e-5 if edge else 1e-6),
            rope_theta=float(rope.get("rope_theta", 1e8 if edge else 5e6)),
            rope_axes_dim=tuple(rope.get("mrope_section", (24, 20, 20))),
            vocab_size=text["vocab_size"],
            qk_norm_for_text=not edge,
            rms_norm_variant="llama",  # transformers' text RMSNorm rounds to the input dtype, then scales
        )
        vision = raw.get("vision_config")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        ids = {k: int(raw.get(k, defaults[k])) for k in
               ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        return cls(
            text=text_config,
            vision=VisionConfig.from_dict(vision) if isinstance(vision, Mapping) and not edge else None,
            max_position_embeddings=int(text.get("max_position_embeddings", defaults["max_position_embeddings"])),
            model_type=model_type,
            **ids,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ReasonerConfig":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"reasoner config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)


@flax.struct.dataclass
class PromptBatch:
    """A left-padded prompt batch, built host-side by `cosmos_jax.reasoner_inputs.batch_prompts`.

    input_ids [B, P] int32; pad [B] int32 (leading pad tokens per row); position_ids [B, 3, P] float32 (mRoPE);
    next_position [B] float32 (text position of the first generated token); visual_index [B, P] int32: index of
    each visual placeholder into the vision embeddings, -1 elsewhere. pixels [N, patch_dim] and `grid` describe
    every image/video patch of the batch (None for text only).
    """

    input_ids: jax.Array
    pad: jax.Array
    position_ids: jax.Array
    next_position: jax.Array
    visual_index: jax.Array
    pixels: jax.Array | None = None
    grid: VisionGrid | None = None


@flax.struct.dataclass
class KVCache:
    """Per-layer keys (after rotary) and values, k, v [L, B, S, K, hd]; pad [B] leading pad slots per row."""

    k: jax.Array
    v: jax.Array
    pad: jax.Array


@dataclasses.dataclass(frozen=True)
class Reasoner:
    """The reasoner (vision encoder + language tower). Hashable: close over it or pass it as a static argument.

    attention: the language tower's attention over its K/V cache, 'xla' (default) | 'blocked' | 'pallas' | 'auto'
    (see modeling/attention.py; 'pallas' runs forward only, which is all prompt logits, prefill and decode need).
    """

    config: ReasonerConfig
    dtype: Any = jnp.bfloat16
    param_dtype: Any = None
    attention: str = "xla"

    def __post_init__(self) -> None:
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"reasoner attention must be one of {IMPLEMENTATIONS}, got {self.attention!r}")

    @property
    def _param_dtype(self) -> Any:
        return self.dtype if self.param_dtype is None else self.param_dtype

    @property
    def layer(self) -> TowerLayer:
        return reasoner_layer(self.config.text, self.dtype, self._param_dtype)

    @property
    def io(self) -> ReasonerIO:
        return ReasonerIO(self.config.text, self.dtype, self._param_dtype)

    @property
    def vision(self) -> VisionEncoder | None:
        if self.config.vision is None:
            return None
        return VisionEncoder(self.config.vision, self.dtype, self._param_dtype)

    def init(self, rng: jax.Array) -> Params:
        """Random params["reasoner"]: embed_tokens, layers (stacked), norm, lm_head (+ vision)."""
        cfg = self.config.text
        k_io, k_layers, k_vision = jax.random.split(rng, 3)
        params = dict(self.io.init(k_io, jnp.zeros((1, 1), jnp.int32))["params"])
        x = jnp.zeros((1, 1, cfg.hidden_size), self.dtype)
        attn = jnp.zeros((1, 1, cfg.num_attention_heads, cfg.head_dim), self.dtype)
        params["layers"] = jax.vmap(lambda k: self.layer.init(k, x, attn)["params"])(
            jax.random.split(k_layers, cfg.num_hidden_layers)
        )
        if self.vision is not None:
            params["vision"] = self.vision.init(k_vision)
        return params

    def abstract_params(self) -> Params:
        return jax.eval_shape(self.init, jax.random.key(0))

    # ---------------------------------------------------------------- forward pieces

    def embed(self, params: Params, prompt: PromptBatch) -> tuple[jax.Array, jax.Array]:
        """Token embeddings with vision embeddings at placeholders [B, P, D], and the deepstack additions
        [n_deep, B, P, D] (zero at text positions; n_deep = 0 without vision)."""
        io_params = {k: params[k] for k in ("embed_tokens", "norm", "lm_head")}
        hidden = self.io.apply({"params": io_params}, prompt.input_ids, method=ReasonerIO.embed)
        if prompt.pixels is None:
            return hidden, jnp.zeros((0, *hidden.shape), hidden.dtype)
        if self.vision is None:
            raise ValueError("this reasoner has no vision encoder (text-only model), but images/video were given")
        merged, deep = self.vision(params["vision"], prompt.pixels, prompt.grid)
        is_visual = (prompt.visual_index >= 0)[..., None]
        index = jnp.maximum(prompt.visual_index, 0)
        hidden = jnp.where(is_visual, jnp.take(merged, index, axis=0).astype(hidden.dtype), hidden)
        deep = jnp.where(is_visual[None], jnp.take(deep, index, axis=1).astype(hidden.dtype), 0)
        return hidden, deep

    def forward(
        self,
        params: Params,
        hidden: jax.Array,
        position_ids: jax.Array,
        deepstack: jax.Array,
        cache: KVCache,
        start: jax.Array | int,
        kv_len: int,
    ) -> tuple[jax.Array, KVCache]:
        """Run T new tokens through every layer, writing their K/V at cache slots [start, start+T).

        hidden [B, T, D]; position_ids [B, 3, T]; deepstack [n_deep, B, T, D] added after layers 0..n_deep-1;
        queries attend to the first `kv_len` (static) cache slots: query i to slots pad[b] .. start+i (left
        padding + causal), with `self.attention`. Returns hidden before the final norm.
        """
        cfg = self.config.text
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype)
        attend = cached_attention_function(self.attention)
        query_start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), cache.pad.shape)
        layer = self.layer
        num_deep = deepstack.shape[0]

        def body(carry, xs):
            h, k_cache, v_cache = carry
            index, layer_params = xs
            q, k, v = layer.apply({"params": layer_params}, h, method=TowerLayer.project)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (index, 0, start, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (index, 0, start, 0, 0))
            keys = jax.lax.dynamic_index_in_dim(k_cache, index, keepdims=False)[:, :kv_len]
            values = jax.lax.dynamic_index_in_dim(v_cache, index, keepdims=False)[:, :kv_len]
            attn = attend(q, keys.astype(q.dtype), values.astype(q.dtype), query_start, cache.pad)
            h = layer.apply({"params": layer_params}, h, attn, method=TowerLayer.finish)
            if num_deep:
                add = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(index, num_deep - 1), keepdims=False)
                h = jnp.where(index < num_deep, h + add, h)
            return (h, k_cache, v_cache), None

        indices = jnp.arange(cfg.num_hidden_layers)
        (hidden, k, v), _ = scan_layers(body, (hidden, cache.k, cache.v), (indices, params["layers"]))
        return hidden, KVCache(k=k, v=v, pad=cache.pad)

    def logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        """Final norm and LM head: [..., D] -> f32 [..., V]."""
        io_params = {k: params[k] for k in ("embed_tokens", "norm", "lm_head")}
        return self.io.apply({"params": io_params}, hidden, method=ReasonerIO.logits).astype(jnp.float32)

    def empty_cache(self, batch: int, length: int, pad: jax.Array) -> KVCache:
        cfg = self.config.text
        shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
        return KVCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype), pad=pad.astype(jnp.int32))

    def prompt_logits(self, params: Params, prompt: PromptBatch) -> jax.Array:
        """Next-token logits at every prompt position [B, P, V] (f32): one full forward, no decoding."""
        batch, length = prompt.input_ids.shape
        hidden, deep = self.embed(params, prompt)
        cache = self.empty_cache(batch, length, prompt.pad)
        hidden, _ = self.forward(params, hidden, prompt.position_ids, deep, cache, 0, length)
        return self.logits(params, hidden)

    def prefill(self, params: Params, prompt: PromptBatch, cache_length: int) -> tuple[jax.Array, KVCache]:
        """Fill a cache of `cache_length` slots with the prompt; return the last position's logits [B, V]."""
        batch, length = prompt.input_ids.shape
        hidden, deep = self.embed(params, prompt)
        cache = self.empty_cache(batch, cache_length, prompt.pad)
        hidden, cache = self.forward(params, hidden, prompt.position_ids, deep, cache, 0, length)
        return self.logits(params, hidden[:, -1]), cache

    def decode_step(
        self, params: Params, tokens: jax.Array, position: jax.Array, cache: KVCache, slot: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """One new token per row: tokens [B] at text position [B] written to cache slot `slot` -> logits [B, V]."""
        io_params = {k: params[k] for k in ("embed_tokens", "norm", "lm_head")}
        hidden = self.io.apply({"params": io_params}, tokens[:, None], method=ReasonerIO.embed)
        positions = jnp.broadcast_to(position.astype(jnp.float32)[:, None, None], (tokens.shape[0], 3, 1))
        no_deep = jnp.zeros((0, *hidden.shape), hidden.dtype)
        hidden, cache = self.forward(params, hidden, positions, no_deep, cache, slot, cache.k.shape[2])
        return self.logits(params, hidden[:, 0]), cache

"""One layer of one tower, the joint Mixture-of-Transformers step that pairs layer i of both towers, and
`scan_layers`, the one loop that runs a layer stack.

A tower layer owns its projections, norms and MLP; the two towers only meet in `joint_layer`, where the
reasoner's keys/values are shared with the generator's queries (docs/model.md, "Two towers and the joint attention"). The same module serves both
towers: the reasoner layer has q/k norms only when `qk_norm_for_text`, the generator layer always has them,
and (Edge) the generator layer owns `und_k_norm`, which normalises the reasoner keys it reads.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.linear import Linear
from cosmos_jax.modeling.mlp import MLP
from cosmos_jax.modeling.norms import RMSNorm
from cosmos_jax.modeling.rope import apply_rope


class TowerLayer(nn.Module):
    """Pre-norm decoder layer: attention projections in, attention output + MLP out. x [B, N, D]."""

    config: Cosmos3Config
    qk_norm: bool
    und_k_norm: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self) -> None:
        cfg = self.config
        dense = lambda features, name: Linear(features, self.dtype, self.param_dtype, name=name)  # noqa: E731
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.norm_variant, self.param_dtype, name=name)  # noqa: E731
        self.q_proj = dense(cfg.num_attention_heads * cfg.head_dim, "q_proj")
        self.k_proj = dense(cfg.num_key_value_heads * cfg.head_dim, "k_proj")
        self.v_proj = dense(cfg.num_key_value_heads * cfg.head_dim, "v_proj")
        self.o_proj = dense(cfg.hidden_size, "o_proj")
        if self.qk_norm:
            self.q_norm = norm("q_norm")
            self.k_norm = norm("k_norm")
        if self.und_k_norm:
            self.und_k_norm_layer = norm("und_k_norm")
        self.input_norm = norm("input_norm")
        self.post_attention_norm = norm("post_attention_norm")
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype, self.param_dtype, name="mlp")

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B,N,D] -> q [B,N,H,hd], k, v [B,N,K,hd]; q/k normalised per head (if enabled), before rotary."""
        cfg = self.config
        h = self.input_norm(x)
        batch, length = x.shape[:2]
        q = self.q_proj(h).reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(h).reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(h).reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def reasoner_keys(self, k_und: jax.Array) -> jax.Array:
        """The reasoner keys as this (generator) layer reads them: normalised by `und_k_norm` if it has one."""
        return self.und_k_norm_layer(k_und) if self.und_k_norm else k_und

    def finish(self, x: jax.Array, attn: jax.Array) -> jax.Array:
        """Residual update from the attention output attn [B,N,H,hd], then the MLP residual."""
        x = x + self.o_proj(attn.reshape(*attn.shape[:2], -1))
        return x + self.mlp(self.post_attention_norm(x))

    def __call__(self, x: jax.Array, attn: jax.Array) -> jax.Array:
        """Touches every parameter (used for init): project, reasoner_keys, finish."""
        q, k, _ = self.project(x)
        del q
        self.reasoner_keys(k)
        return self.finish(x, attn)


def reasoner_layer(config: Cosmos3Config, dtype: jnp.dtype, param_dtype: jnp.dtype) -> TowerLayer:
    return TowerLayer(config, qk_norm=config.qk_norm_for_text, und_k_norm=False, dtype=dtype, param_dtype=param_dtype)


def generator_layer(config: Cosmos3Config, dtype: jnp.dtype, param_dtype: jnp.dtype) -> TowerLayer:
    return TowerLayer(
        config, qk_norm=True, und_k_norm=config.has_und_k_norm_for_gen, dtype=dtype, param_dtype=param_dtype
    )


class Rotary(NamedTuple):
    """cos/sin tables [B, N, head_dim] for one tower's tokens."""

    cos: jax.Array
    sin: jax.Array


class ReasonerKV(NamedTuple):
    """What the generator reads from one reasoner layer: keys (as the generator sees them, after rotary) and
    values, [B, Lu, K, hd] each."""

    k: jax.Array
    v: jax.Array


AttentionFn = Callable[..., jax.Array]


def reasoner_step(
    layer: TowerLayer,
    gen_layer: TowerLayer,
    r_params,
    g_params,
    und: jax.Array,
    rope: Rotary,
    und_len: jax.Array,
    reasoner_attention: AttentionFn,
) -> tuple[jax.Array, ReasonerKV]:
    """One reasoner layer: causal self-attention + MLP. Returns the new hidden state and the K/V it offers the
    generator tower (which depends on the generator's `und_k_norm` on Edge, hence `g_params`)."""
    q, k, v = layer.apply({"params": r_params}, und, method=TowerLayer.project)
    k_for_gen = gen_layer.apply({"params": g_params}, k, method=TowerLayer.reasoner_keys)
    q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
    k_for_gen = apply_rope(k_for_gen, rope.cos, rope.sin)
    attn = reasoner_attention(q, k, v, und_len)
    return layer.apply({"params": r_params}, und, attn, method=TowerLayer.finish), ReasonerKV(k_for_gen, v)


def generator_step(
    layer: TowerLayer,
    g_params,
    gen: jax.Array,
    rope: Rotary,
    kv: ReasonerKV,
    und_len: jax.Array,
    gen_len: jax.Array,
    generator_attention: AttentionFn,
) -> jax.Array:
    """One generator layer: attention over the reasoner K/V plus its own tokens (no mask), then its MLP."""
    q, k, v = layer.apply({"params": g_params}, gen, method=TowerLayer.project)
    q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
    attn = generator_attention(q, kv.k, kv.v, k, v, und_len, gen_len)
    return layer.apply({"params": g_params}, gen, attn, method=TowerLayer.finish)


def scan_layers(layer_fn: Callable[[Any, Any], tuple[Any, Any]], carry: Any, per_layer: Any, *,
                remat: bool = False) -> tuple[Any, Any]:
    """Run a layer stack: `layer_fn(carry, layer) -> (carry, out)` once per layer, in one `jax.lax.scan`.

    `per_layer` is a pytree whose leaves all lead with the layer axis (the stacked weights of one or both towers,
    a per-layer K/V cache, layer indices); `layer_fn` sees layer i's slice of each. Returns the last carry and the
    per-layer outputs stacked on a leading layer axis (None when `layer_fn` returns None). The four layer loops
    of the package run through it: the joint forward, the reasoner encode and the generator's denoising step
    (`Cosmos3Transformer`), and the reasoner's prefill / decode step (`Reasoner.forward`).
    remat: recompute each layer's activations in the backward pass (one layer's activation memory, not all).
    """
    return jax.lax.scan(jax.checkpoint(layer_fn) if remat else layer_fn, carry, per_layer)

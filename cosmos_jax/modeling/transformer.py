"""The Cosmos 3 Mixture-of-Transformers model: two parameter trees, layers scanned, one joint attention per layer.

    params = {"reasoner":  {"embed_tokens", "layers" (stacked), "norm", "lm_head"},
              "generator": {"layers" (stacked), "norm", "proj_in", "proj_out", "time_embedder",
                            "action_proj_in", "action_proj_out", "action_modality_embed",
                            "audio_proj_in", "audio_proj_out", "audio_modality_embed"}}

Three entry points, all pure and jittable:
  `model(params, text, gen)`                   the joint forward, both towers layer by layer (as the reference);
  `model.encode_reasoner(params, text)`        the reasoner tower alone -> per-layer K/V cache (once per prompt);
  `model.denoise_step(params, cache, gen)`     the generator tower alone against that cache (every step).
The reasoner never reads generator tokens, so `denoise_step(encode_reasoner(text), gen) == model(text, gen)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cosmos_jax.config import Cosmos3Config, param_dtype
from cosmos_jax.modeling import context_parallel
from cosmos_jax.modeling.attention import attention_functions
from cosmos_jax.modeling.inputs import GeneratorInputs, GeneratorOutputs, ReasonerCache, TextInputs
from cosmos_jax.modeling.layers import (
    ReasonerKV,
    Rotary,
    TowerLayer,
    generator_layer,
    generator_step,
    reasoner_layer,
    reasoner_step,
    scan_layers,
)
from cosmos_jax.modeling.weights import materialize_tree
from cosmos_jax.modeling.rope import mrope_cos_sin
from cosmos_jax.modeling.towers import GeneratorIO, ReasonerIO

Params = dict[str, Any]

_UND = ("batch", "seq", "act_embed")  # logical axes of the reasoner hidden states (cosmos_jax.sharding)
_GEN = ("batch", "gen_seq", "act_embed")  # logical axes of the generator hidden states


@dataclasses.dataclass(frozen=True)
class Cosmos3Transformer:
    """A configured model (hashable, so it can be closed over or passed as a static argument to jit).

    dtype: activation/compute dtype; param_dtype: storage dtype of the weights (defaults to dtype; the time
    embedder is always f32). attention: 'auto' | 'xla' | 'blocked' | 'pallas' (see modeling/attention.py).
    remat: rematerialise each scanned layer in the backward pass (training).
    sharding: None (no constraints) or a `cosmos_jax.sharding.ActivationSharding`: the hidden states are
    constrained by logical axis names, and the generator attention runs context-parallel on a `context` axis.
    w8a8: the linear groups ("generation", "reasoner" in the layers, "native" for the generator's modality
    projections) whose FP8 kernels (`Fp8Kernel`, ModelOpt's FP8 revision) run W8A8 (`cosmos_jax.modeling.linear`);
    the others, and every FP8 kernel when empty, run W8A16.
    """

    config: Cosmos3Config
    dtype: Any = jnp.bfloat16
    param_dtype: Any = None
    attention: str = "auto"
    remat: bool = False
    sharding: Any = None
    w8a8: frozenset[str] = frozenset()

    @property
    def _param_dtype(self) -> Any:
        return self.dtype if self.param_dtype is None else self.param_dtype

    @property
    def reasoner_layer(self) -> TowerLayer:
        return reasoner_layer(self.config, self.dtype, self._param_dtype)

    @property
    def generator_layer(self) -> TowerLayer:
        return generator_layer(self.config, self.dtype, self._param_dtype)

    @property
    def reasoner_io(self) -> ReasonerIO:
        return ReasonerIO(self.config, self.dtype, self._param_dtype)

    @property
    def generator_io(self) -> GeneratorIO:
        return GeneratorIO(self.config, self.dtype, self._param_dtype)

    # ---------------------------------------------------------------- parameters

    def init(self, rng: jax.Array) -> Params:
        """Random parameters for both trees (layer stacks have a leading [num_hidden_layers] axis)."""
        cfg = self.config
        r_key, g_key, rl_key, gl_key = jax.random.split(rng, 4)
        x = jnp.zeros((1, 1, cfg.hidden_size), self.dtype)
        attn = jnp.zeros((1, 1, cfg.num_attention_heads, cfg.head_dim), self.dtype)

        def stacked(layer: TowerLayer, key: jax.Array) -> Params:
            keys = jax.random.split(key, cfg.num_hidden_layers)
            return jax.vmap(lambda k: layer.init(k, x, attn)["params"])(keys)

        reasoner = dict(self.reasoner_io.init(r_key, jnp.zeros((1, 1), jnp.int32))["params"])
        reasoner["layers"] = stacked(self.reasoner_layer, rl_key)
        generator = dict(self.generator_io.init(g_key, _dummy_generator_inputs(cfg, self.dtype))["params"])
        generator["layers"] = stacked(self.generator_layer, gl_key)
        return {"reasoner": reasoner, "generator": generator}

    def abstract_params(self) -> Params:
        """Shapes and dtypes of `init`'s result, with nothing allocated."""
        return jax.eval_shape(self.init, jax.random.key(0))

    # ---------------------------------------------------------------- helpers

    def _rotary(self, position_ids: jax.Array) -> Rotary:
        cfg = self.config
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype)
        return Rotary(cos, sin)

    def _constrain(self, x: jax.Array, names: tuple[str, ...]) -> jax.Array:
        return x if self.sharding is None else self.sharding.constrain(x, names)

    def _attention_functions(self):
        reasoner_attention, generator_attention = attention_functions(self.attention)
        if self.sharding is not None:
            generator_attention = context_parallel.sharded_generator_attention(generator_attention, self.sharding)
        return reasoner_attention, generator_attention

    def _reasoner_embed(self, params: Params, text: TextInputs) -> jax.Array:
        return self.reasoner_io.apply({"params": _io(params["reasoner"], self.w8a8)}, text.input_ids,
                                      method=ReasonerIO.embed)

    # ---------------------------------------------------------------- entry points

    def encode_reasoner(self, params: Params, text: TextInputs) -> tuple[ReasonerCache, jax.Array]:
        """Run the reasoner tower over the prompt. Returns the K/V cache and the final hidden states
        [B, Lu, D] (before the final norm)."""
        reasoner_attention, _ = self._attention_functions()
        rope = self._rotary(text.position_ids)
        r_layer, g_layer = self.reasoner_layer, self.generator_layer

        def body(und, layer_params):
            r_params, g_params = materialize_tree(layer_params, self.w8a8)
            und = self._constrain(und, _UND)
            und, kv = reasoner_step(r_layer, g_layer, r_params, g_params, und, rope, text.und_len, reasoner_attention)
            return und, kv

        und, kv = scan_layers(
            body,
            self._reasoner_embed(params, text),
            (params["reasoner"]["layers"], _und_k_norm_params(params["generator"]["layers"])),
            remat=self.remat,
        )
        return ReasonerCache(k=kv.k, v=kv.v, und_len=text.und_len), und

    def denoise_step(self, params: Params, cache: ReasonerCache, gen: GeneratorInputs) -> GeneratorOutputs:
        """Run only the generator tower against a reasoner cache (one denoising step)."""
        _, generator_attention = self._attention_functions()
        g_io = self.generator_io
        g_io_params = {"params": _io(params["generator"], self.w8a8)}
        hidden = g_io.apply(g_io_params, gen, method=GeneratorIO.embed)
        rope = self._rotary(gen.position_ids)
        gen_len = jnp.full(cache.und_len.shape, hidden.shape[1], jnp.int32)
        g_layer = self.generator_layer

        def body(hidden, layer_inputs):
            g_params, k, v = layer_inputs
            g_params = materialize_tree(g_params, self.w8a8)
            kv = ReasonerKV(k, v)
            hidden = self._constrain(hidden, _GEN)
            return generator_step(g_layer, g_params, hidden, rope, kv, cache.und_len, gen_len, generator_attention), None

        hidden, _ = scan_layers(body, hidden, (params["generator"]["layers"], cache.k, cache.v), remat=self.remat)
        return g_io.apply(g_io_params, hidden, gen, method=GeneratorIO.head)

    def __call__(self, params: Params, text: TextInputs, gen: GeneratorInputs) -> GeneratorOutputs:
        """The joint forward: layer i of both towers, then layer i+1, as the reference runs it."""
        return self.joint(params, text, gen)[0]

    def joint(self, params: Params, text: TextInputs, gen: GeneratorInputs) -> tuple[GeneratorOutputs, jax.Array]:
        """The joint forward, also returning the reasoner's final hidden states [B, Lu, D] (before its norm)."""
        reasoner_attention, generator_attention = self._attention_functions()
        g_io = self.generator_io
        g_io_params = {"params": _io(params["generator"], self.w8a8)}
        gen_hidden = g_io.apply(g_io_params, gen, method=GeneratorIO.embed)
        und_rope, gen_rope = self._rotary(text.position_ids), self._rotary(gen.position_ids)
        gen_len = jnp.full(text.und_len.shape, gen_hidden.shape[1], jnp.int32)
        r_layer, g_layer = self.reasoner_layer, self.generator_layer

        def body(carry, layer_params):
            und, hidden = carry
            r_params, g_params = materialize_tree(layer_params, self.w8a8)
            und, hidden = self._constrain(und, _UND), self._constrain(hidden, _GEN)
            und, kv = reasoner_step(r_layer, g_layer, r_params, g_params, und, und_rope, text.und_len, reasoner_attention)
            hidden = generator_step(g_layer, g_params, hidden, gen_rope, kv, text.und_len, gen_len, generator_attention)
            return (und, hidden), None

        (und_hidden, gen_hidden), _ = scan_layers(
            body,
            (self._reasoner_embed(params, text), gen_hidden),
            (params["reasoner"]["layers"], params["generator"]["layers"]),
            remat=self.remat,
        )
        return g_io.apply(g_io_params, gen_hidden, gen, method=GeneratorIO.head), und_hidden

    def reasoner_logits(self, params: Params, text: TextInputs) -> jax.Array:
        """Next-token logits [B, Lu, V] of the reasoner language model over text."""
        _, hidden = self.encode_reasoner(params, text)
        return self.reasoner_io.apply({"params": _io(params["reasoner"], self.w8a8)}, hidden,
                                      method=ReasonerIO.logits)


def _io(tower: Params, w8a8: frozenset[str]) -> Params:
    """A tower's parameters without its layer stack (what the tower's IO module owns), materialized if held
    quantized or with a LoRA update, except the FP8 kernels whose group is in `w8a8` (they run W8A8)."""
    return materialize_tree({k: v for k, v in tower.items() if k != "layers"}, w8a8)


def _und_k_norm_params(generator_layers: Params) -> Params:
    """The only generator-layer parameters the reasoner pass reads (Edge's `und_k_norm`); empty otherwise."""
    return {k: v for k, v in generator_layers.items() if k == "und_k_norm"}


def _dummy_generator_inputs(cfg: Cosmos3Config, dtype: Any) -> GeneratorInputs:
    """A 1-token-per-modality input that touches every generator IO parameter (for init)."""
    p = cfg.latent_patch_size
    sound = action = None
    one = jnp.ones((1,), jnp.float32)
    if cfg.sound_gen:
        sound = jnp.zeros((1, cfg.sound_dim, 1), dtype)
    if cfg.action_gen:
        action = jnp.zeros((1, 1, cfg.action_dim), dtype)
    return GeneratorInputs(
        position_ids=jnp.zeros((1, 3, 1), jnp.float32),
        vision=jnp.zeros((1, cfg.latent_channel, 1, p, p), dtype),
        vision_noisy=jnp.ones((1, 1), bool),
        vision_t=one,
        sound=sound,
        sound_noisy=None if sound is None else jnp.ones((1, 1), bool),
        sound_t=None if sound is None else one,
        action=action,
        action_noisy=None if action is None else jnp.ones((1, 1), bool),
        action_t=None if action is None else one,
        action_domain=None if action is None else jnp.zeros((1,), jnp.int32),
    )


def cast_params(params: Params, dtype: Any) -> Params:
    """A transformer params tree cast by the dtype policy: each leaf to `param_dtype(its path, dtype)` (the time
    embedder stays float32)."""

    def cast(path: tuple[Any, ...], x: jax.Array) -> jax.Array:
        return x.astype(param_dtype([str(getattr(p, "key", p)) for p in path], dtype))

    return jax.tree_util.tree_map_with_path(cast, params)

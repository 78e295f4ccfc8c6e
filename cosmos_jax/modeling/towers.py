"""The non-layer parameters of each tower: token embedding and LM head (reasoner); modality projections, time
embedding and output heads (generator); docs/model.md describes what they compute."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.embeddings import DomainAwareLinear, TimestepEmbedding, timestep_sinusoid
from cosmos_jax.modeling.inputs import GeneratorInputs, GeneratorOutputs
from cosmos_jax.modeling.linear import Linear
from cosmos_jax.modeling.norms import RMSNorm
from cosmos_jax.modeling.patchify import frame_mask_to_tokens, patch_grid, patchify, unpatchify


class ReasonerIO(nn.Module):
    """embed_tokens [V, D], final norm, lm_head [D, V]."""

    config: Cosmos3Config
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="embed_tokens"
        )
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_variant, self.param_dtype, name="norm")
        self.lm_head = nn.Dense(
            cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="lm_head"
        )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, Lu] int -> [B, Lu, D]."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm then LM head: [B, Lu, D] -> [B, Lu, V]."""
        return self.lm_head(self.norm(hidden))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.logits(self.embed(input_ids))


class GeneratorIO(nn.Module):
    """proj_in/out (vision patches), time_embedder (f32), audio_* and action_* heads, final norm."""

    config: Cosmos3Config
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self) -> None:
        cfg = self.config
        dense = lambda features, name: Linear(  # noqa: E731  (an FP8 revision's kernel may stay float8: W8A8)
            features, self.dtype, self.param_dtype, use_bias=True, name=name
        )
        self.proj_in = dense(cfg.hidden_size, "proj_in")
        self.proj_out = dense(cfg.patch_latent_dim, "proj_out")
        self.time_embedder = TimestepEmbedding(cfg.hidden_size, name="time_embedder")
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_variant, self.param_dtype, name="norm")
        if cfg.sound_gen:
            self.audio_proj_in = dense(cfg.hidden_size, "audio_proj_in")
            self.audio_proj_out = dense(cfg.sound_dim, "audio_proj_out")
            self.audio_modality_embed = self.param(
                "audio_modality_embed", nn.initializers.zeros, (cfg.hidden_size,), self.param_dtype
            )
        if cfg.action_gen:
            domain_linear = lambda features, name: DomainAwareLinear(  # noqa: E731
                features, cfg.num_embodiment_domains, self.dtype, self.param_dtype, name=name
            )
            self.action_proj_in = domain_linear(cfg.hidden_size, "action_proj_in")
            self.action_proj_out = domain_linear(cfg.action_dim, "action_proj_out")
            self.action_modality_embed = self.param(
                "action_modality_embed", nn.initializers.zeros, (cfg.hidden_size,), self.param_dtype
            )

    def _time_embedding(self, t: jax.Array) -> jax.Array:
        """t [B] raw timesteps -> [B, 1, D] in the model dtype (computed in f32)."""
        scaled = t.astype(jnp.float32) * jnp.float32(self.config.timestep_scale)
        return self.time_embedder(timestep_sinusoid(scaled)).astype(self.dtype)[:, None, :]

    def _add_time(self, tokens: jax.Array, t: jax.Array, noisy: jax.Array) -> jax.Array:
        """Add the time embedding to noisy tokens only (clean tokens get none, not t=0). noisy [B, N] bool."""
        return jnp.where(noisy[..., None], tokens + self._time_embedding(t), tokens)

    def embed(self, inputs: GeneratorInputs) -> jax.Array:
        """The generator token sequence [B, Lg, D]: vision, then sound, then action tokens."""
        cfg = self.config
        vision = inputs.vision
        _, hp, wp = patch_grid(vision.shape[2:], cfg.latent_patch_size)
        tokens = self.proj_in(patchify(vision.astype(self.dtype), cfg.latent_patch_size))
        segments = [self._add_time(tokens, inputs.vision_t, frame_mask_to_tokens(inputs.vision_noisy, hp * wp))]
        if inputs.sound is not None:
            if not cfg.sound_gen:
                raise ValueError("sound inputs given but the config has sound_gen=False")
            sound = jnp.swapaxes(inputs.sound, 1, 2).astype(self.dtype)
            sound = self.audio_proj_in(sound) + self.audio_modality_embed.astype(self.dtype)
            segments.append(self._add_time(sound, inputs.sound_t, inputs.sound_noisy))
        if inputs.action is not None:
            if not cfg.action_gen:
                raise ValueError("action inputs given but the config has action_gen=False")
            action = self.action_proj_in(inputs.action.astype(self.dtype), inputs.action_domain)
            action = action + self.action_modality_embed.astype(self.dtype)
            segments.append(self._add_time(action, inputs.action_t, inputs.action_noisy))
        return jnp.concatenate(segments, axis=1)

    def head(self, hidden: jax.Array, inputs: GeneratorInputs) -> GeneratorOutputs:
        """Final norm and per-modality output heads; velocities are zero at clean frames/rows."""
        cfg = self.config
        hidden = self.norm(hidden)
        latent_shape = inputs.vision.shape[2:]
        t, hp, wp = patch_grid(latent_shape, cfg.latent_patch_size)
        num_vision = t * hp * wp
        vision = unpatchify(
            self.proj_out(hidden[:, :num_vision]), latent_shape, cfg.latent_channel, cfg.latent_patch_size
        )
        vision = jnp.where(inputs.vision_noisy[:, None, :, None, None], vision, 0)
        offset = num_vision
        sound = action = None
        if inputs.sound is not None:
            num_sound = inputs.sound.shape[2]
            sound = jnp.swapaxes(self.audio_proj_out(hidden[:, offset : offset + num_sound]), 1, 2)
            sound = jnp.where(inputs.sound_noisy[:, None, :], sound, 0)
            offset += num_sound
        if inputs.action is not None:
            num_action = inputs.action.shape[1]
            action = self.action_proj_out(hidden[:, offset : offset + num_action], inputs.action_domain)
            action = jnp.where(inputs.action_noisy[..., None], action, 0)
        return GeneratorOutputs(vision=vision, sound=sound, action=action)

    def __call__(self, inputs: GeneratorInputs) -> GeneratorOutputs:
        return self.head(self.embed(inputs), inputs)

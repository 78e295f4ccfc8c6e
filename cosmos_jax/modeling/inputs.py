"""The model's inputs as pytrees with static shapes (built host-side by `cosmos_jax.packing`).

Batch rows are independent sequences (e.g. the two guidance branches, or training samples). Reasoner text is
right-padded to a common length Lu; `und_len` holds each row's real length. Every row has the same generator
layout (vision, then sound, then action tokens), so the generator part has no padding.
"""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class TextInputs:
    """input_ids [B, Lu] int32 (right-padded), und_len [B] int32, position_ids [B, 3, Lu] float32."""

    input_ids: jax.Array
    und_len: jax.Array
    position_ids: jax.Array


@flax.struct.dataclass
class GeneratorInputs:
    """The generator tower's tokens for one denoising step.

    position_ids [B, 3, Lg] float32 for the generator tokens (vision, sound, action in that order).
    vision [B, C, T, H, W] latents; vision_noisy [B, T] bool (False = clean conditioning frame);
    vision_t [B] float32: the raw scheduler timestep (e.g. 995.0), scaled by `timestep_scale` inside.
    sound [B, S, Ts] with sound_noisy [B, Ts] and sound_t [B], or None.
    action [B, chunk, A] with action_noisy [B, chunk], action_t [B], action_domain [B] int32, or None.
    """

    position_ids: jax.Array
    vision: jax.Array
    vision_noisy: jax.Array
    vision_t: jax.Array
    sound: jax.Array | None = None
    sound_noisy: jax.Array | None = None
    sound_t: jax.Array | None = None
    action: jax.Array | None = None
    action_noisy: jax.Array | None = None
    action_t: jax.Array | None = None
    action_domain: jax.Array | None = None


@flax.struct.dataclass
class GeneratorOutputs:
    """Velocities, zero at clean frames/rows: vision [B, C, T, H, W], sound [B, S, Ts] | None, action [B, chunk, A] | None."""

    vision: jax.Array
    sound: jax.Array | None = None
    action: jax.Array | None = None


@flax.struct.dataclass
class ReasonerCache:
    """Per-layer reasoner K/V as the generator reads them: k, v [layers, B, Lu, K, hd]; und_len [B]."""

    k: jax.Array
    v: jax.Array
    und_len: jax.Array

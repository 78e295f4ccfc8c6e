"""How much work and memory one generation request takes, estimated from its sizes before anything compiles.

Used by `generate` to say up front what a request costs (tokens, steps, FLOPs, a lower bound on the time at
this machine's measured matmul rate) and to refuse sizes whose working set cannot fit, naming a size that would.
The memory figure is a coarse lower bound of the largest live buffers, so it only refuses clearly hopeless sizes:
the decoded video (float32 and uint8), the VAE decoder's full-resolution activations for one latent frame
(decoder width x 4 pixel frames x 6 live tensors), the generator activations of one layer for every guidance
branch, and, with attention="xla", the [branches, heads, tokens, tokens] score matrix. With several samples,
the FLOPs count every sample and the memory counts the samples one device holds at once (a batch's rows on one
device: their generator activations and score matrices, and their decoded videos, which a batch returns together).
"""

from __future__ import annotations

import dataclasses
import os
import time

from cosmos_jax.config import Cosmos3Config

_VAE_LIVE_TENSORS = 6
_PIXEL_FRAMES_PER_LATENT = 4


@dataclasses.dataclass(frozen=True)
class WorkEstimate:
    """Sizes of one request: generator tokens (vision + sound + action), text tokens, steps, guidance branches,
    how many samples in all and how many one device holds at once, total FLOPs of the denoising loops, and the
    coarse memory lower bound in bytes."""

    vision_tokens: int
    other_tokens: int
    text_tokens: int
    steps: int
    branches: int
    samples: int
    samples_per_device: int
    flops: float
    bytes: int


def estimate(config: Cosmos3Config, *, frames: int, height: int, width: int, latent_shape: tuple[int, int, int],
             text_tokens: int, other_tokens: int, steps: int, branches: int, decoder_width: int | None,
             dense_attention: bool, samples: int = 1, samples_per_device: int = 1) -> WorkEstimate:
    """The estimate for `samples` samples of `frames` x `height` x `width` pixels and `latent_shape` (T, h, w)
    latents, `samples_per_device` of them resident on one device at a time."""
    if not 1 <= samples_per_device <= samples:
        raise ValueError(f"samples_per_device must be in 1..{samples} (samples), got {samples_per_device}")
    p = config.latent_patch_size
    t, h, w = latent_shape
    vision = t * -(-h // p) * -(-w // p)
    tokens = vision + other_tokens
    heads, kv, hd, d, inner = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                               config.hidden_size, config.intermediate_size)
    per_token = 2 * config.num_hidden_layers * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inner)
    attention = 4 * config.num_hidden_layers * heads * hd * tokens * (tokens + text_tokens)
    flops = float(samples * steps * branches * (tokens * per_token + attention))
    video = frames * height * width * 3 * (4 + 1)
    vae = 4 * (decoder_width or 0) * _PIXEL_FRAMES_PER_LATENT * height * width * _VAE_LIVE_TENSORS
    generator = 4 * branches * tokens * (3 * d + 2 * inner + heads * hd + 2 * kv * hd) * 2
    scores = 4 * branches * heads * tokens * (tokens + text_tokens) if dense_attention else 0
    resident = samples_per_device * (video + generator + scores) + vae
    return WorkEstimate(vision, other_tokens, text_tokens, steps, branches, samples, samples_per_device, flops,
                        resident)


def available_bytes() -> int | None:
    """Memory of the default JAX device (bytes_limit on GPU/TPU, physical RAM on CPU); None when unknown."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def matmul_rate() -> float:
    """FLOP/s of one 1024x1024 float32 matmul on the default device (best of 3): an upper bound on the rate."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / max(best, 1e-9)


def format_estimate(e: WorkEstimate, rate: float | None) -> str:
    """`44,160 video tokens (+ 0 sound/action, 300 text), 35 steps x 2 branches: 120.3 TFLOP, >= 5.1 min at ...`."""
    text = (f"{e.vision_tokens:,} video tokens (+ {e.other_tokens:,} sound/action, {e.text_tokens:,} text), "
            f"{e.steps} steps x {e.branches} guidance branch{'es' if e.branches > 1 else ''}"
            + (f" x {e.samples} samples ({e.samples_per_device} per device at once)" if e.samples > 1 else "")
            + ": "
            + (f"{e.flops / 1e12:.1f} TFLOP" if e.flops >= 1e11 else f"{e.flops / 1e9:.2f} GFLOP"))
    if rate:
        seconds = e.flops / rate
        shown = f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        text += f", at least {shown} at this device's measured matmul rate ({rate / 1e9:.0f} GFLOP/s)"
    return text

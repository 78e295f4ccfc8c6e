"""Sound tokenizer decode: JAX vs the diffusers PyTorch reference, same tiny random weights, same input.

    python tools/bench_audio.py [--seconds 2] [--dec-dim 8] [--repeats 5]

Prints one markdown table: median wall time of `decode` per backend (after warm-up / compile), the JAX
compile time, the JAX/torch time ratio and the max abs difference of the two waveforms.
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer

from cosmos_jax.convert.keymap_audio import audio_params_from_torch_state
from cosmos_jax.modeling.audio_tokenizer import AudioTokenizer, AudioTokenizerConfig
from timing import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="audio length to decode")
    parser.add_argument("--dec-dim", type=int, default=8, help="decoder base width (320 in the real model)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    kwargs = dict(dec_dim=args.dec_dim, encoder_enabled=False)
    torch.manual_seed(0)
    reference = Cosmos3AVAEAudioTokenizer(**kwargs).eval()
    config = AudioTokenizerConfig(**kwargs)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    params = jax.device_put(audio_params_from_torch_state(state, config))
    tokenizer = AudioTokenizer(config)

    frames = round(args.seconds * config.sampling_rate / config.hop_length)
    latents = np.random.default_rng(0).standard_normal((1, config.latent_channels, frames)).astype(np.float32)
    latents_torch = torch.from_numpy(latents)
    latents_jax = jax.device_put(latents)

    def run_torch() -> np.ndarray:
        with torch.no_grad():
            return reference.decode(latents_torch).numpy()

    def run_jax() -> np.ndarray:
        return np.asarray(jax.block_until_ready(tokenizer.decode(params, latents_jax)))

    start = time.perf_counter()
    ours = run_jax()
    compile_s = time.perf_counter() - start
    expected = run_torch()
    jax_s = median_seconds(run_jax, args.repeats)
    torch_s = median_seconds(run_torch, args.repeats)

    device = jax.devices()[0]
    print(f"Sound tokenizer decode, dec_dim {args.dec_dim}, {frames} latent frames -> {args.seconds:g} s of "
          f"48 kHz stereo; fp32; median of {args.repeats}; {platform.processor() or platform.machine()}, "
          f"JAX on {device.platform} ({device.device_kind}), torch CPU with {torch.get_num_threads()} threads.\n")
    print("| backend | decode (ms) | JAX compile (s) | JAX / torch | max abs diff |")
    print("|---|---|---|---|---|")
    print(f"| torch {torch.__version__} | {torch_s * 1e3:.1f} | | | |")
    print(f"| JAX {jax.__version__} | {jax_s * 1e3:.1f} | {compile_s:.1f} | {jax_s / torch_s:.2f} | "
          f"{np.abs(ours - expected).max():.1e} |")


if __name__ == "__main__":
    main()

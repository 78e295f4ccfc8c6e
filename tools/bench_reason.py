"""Reasoner decoding speed: JAX (prefill + jitted while_loop over a preallocated KV cache) vs transformers'
`Cosmos3OmniForConditionalGeneration.generate`, same small random fp32 model, same prompt (text + one image).

    python tools/bench_reason.py [--layers 4] [--hidden 256] [--prompt-tokens 64] [--new-tokens 64] [--repeats 3]

Prints one markdown table: time to first token (prefill incl. the vision encoder, and the first token's logits),
decode tokens/s (new tokens after the first, / the time after the first), the JAX compile time, and whether the
greedy ids agree. Times are medians over --repeats, after one warm-up run.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Cosmos3OmniConfig, Cosmos3OmniForConditionalGeneration

from cosmos_jax import reasoner_inputs as ri
from cosmos_jax.convert.load import load_reasoner
from cosmos_jax.sampling import reason
from timing import median_seconds

IMAGE_ID, VIDEO_ID, START_ID, END_ID = 4090, 4091, 4092, 4093


def _torch_model(args: argparse.Namespace) -> Cosmos3OmniForConditionalGeneration:
    heads = args.hidden // 64
    text = dict(vocab_size=4096, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                              "mrope_section": [12, 10, 10], "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=2, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=args.hidden, num_position_embeddings=256,
                  deepstack_visual_indexes=[1, 2])
    config = Cosmos3OmniConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                               video_token_id=VIDEO_ID, vision_start_token_id=START_ID, vision_end_token_id=END_ID)
    torch.manual_seed(0)
    model = Cosmos3OmniForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.normal_()
            elif p.ndim >= 2 and "pos_embed" not in name:
                p.normal_(0, float(np.prod(p.shape[1:])) ** -0.5)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens (plus 64 image tokens)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch_model = _torch_model(args)
    with tempfile.TemporaryDirectory() as folder:
        torch_model.save_pretrained(folder)
        model, params = load_reasoner(folder, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    settings = ri.ProcessorSettings(min_pixels=64 * 64, max_pixels=256 * 256)
    text_ids = rng.integers(0, 4000, args.prompt_tokens).tolist()
    prompt = ri.expand_placeholders([START_ID, IMAGE_ID, END_ID] + text_ids,
                                    [ri.preprocess_image(image, settings)], model.config, lambda s: [])
    batch = ri.batch_prompts([prompt], model.config)
    n = args.new_tokens

    prefill = jax.jit(model.prefill, static_argnums=2)
    start = time.perf_counter()
    jax.block_until_ready(prefill(params, batch, len(prompt.ids) + n))
    reason.generate(model, params, batch, max_new_tokens=n, eos_ids=(-1,))
    compile_s = time.perf_counter() - start
    jax_ttft = median_seconds(lambda: jax.block_until_ready(prefill(params, batch, len(prompt.ids) + n)), args.repeats)
    jax_total = median_seconds(lambda: reason.generate(model, params, batch, max_new_tokens=n, eos_ids=(-1,)),
                               args.repeats)
    jax_ids = reason.generate(model, params, batch, max_new_tokens=n, eos_ids=(-1,))[0][0]

    inputs = {
        "input_ids": torch.tensor([prompt.ids]),
        "mm_token_type_ids": torch.tensor([prompt.token_types]),
        "attention_mask": torch.ones(1, len(prompt.ids), dtype=torch.long),
        "pixel_values": torch.from_numpy(prompt.items[0].pixels),
        "image_grid_thw": torch.tensor([prompt.items[0].grid]),
    }

    def torch_generate(tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return torch_model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)

    torch_generate(2)
    torch_ttft = median_seconds(lambda: torch_generate(1), args.repeats)
    torch_total = median_seconds(lambda: torch_generate(n), args.repeats)
    torch_ids = torch_generate(n)[0, len(prompt.ids):].numpy()

    def tokens_per_s(ttft: float, total: float) -> str:
        decode = total - ttft
        return f"{(n - 1) / decode:.1f}" if decode > 0 else "n/a (decode within timer noise: raise --new-tokens)"

    def row(name: str, ttft: float, total: float, extra: str) -> str:
        return f"| {name} | {ttft * 1e3:.1f} | {tokens_per_s(ttft, total)} | {total:.3f} | {extra} |"

    print(f"Reasoner greedy decode, fp32, {platform.processor() or platform.machine()} "
          f"({jax.device_count()} JAX CPU devices, torch {torch.get_num_threads()} threads); "
          f"{args.layers} layers x {args.hidden} hidden, vision depth 4; prompt {len(prompt.ids)} tokens "
          f"({len(prompt.ids) - args.prompt_tokens - 2} image), {n} new tokens\n")
    print("| backend | time to first token (ms) | decode tokens/s | total (s) | notes |")
    print("|---|---|---|---|---|")
    print(row("transformers 5.23 (eager/sdpa)", torch_ttft, torch_total, "generate()"))
    print(row("cosmos-jax", jax_ttft, jax_total, f"compile {compile_s:.1f}s (once per shape)"))
    torch_decode, jax_decode = torch_total - torch_ttft, jax_total - jax_ttft
    ratio = f"{torch_decode / jax_decode:.2f}x" if torch_decode > 0 and jax_decode > 0 else "n/a"
    print(f"\nJAX/torch decode speed ratio: {ratio}; time-to-first-token ratio: {torch_ttft / jax_ttft:.2f}x; "
          f"greedy ids identical: {bool(np.array_equal(jax_ids, torch_ids))}")


if __name__ == "__main__":
    main()

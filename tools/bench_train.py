"""One training step, JAX (jitted `train_step_fn`) vs diffusers' Cosmos3OmniTransformer (eager torch), same
weights, fp32, one process, both towers trained, AdamW + clipping on both sides.

    python tools/bench_train.py [--layers 4] [--hidden 256] [--text 32] [--latent 4 16 16] [--repeats 5]

Reports seconds per step (best of `repeats` after a warm-up), tokens/s (text + vision tokens per step) and the
JAX/torch speed ratio. The torch step is: forward on x_σ, the masked velocity loss, backward, clip, AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cosmos_jax.convert.keymap_transformer import params_from_torch_state  # noqa: E402
from cosmos_jax.modeling.inputs import GeneratorInputs  # noqa: E402
from cosmos_jax.modeling.transformer import Cosmos3Transformer  # noqa: E402
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence  # noqa: E402
from cosmos_jax.sharding import load_mesh_preset, make_mesh, param_shardings  # noqa: E402
from cosmos_jax.training.losses import LossConfig, TrainBatch  # noqa: E402
from cosmos_jax.training.step import (  # noqa: E402
    OptimConfig,
    batch_shardings,
    init_state,
    jit_train_step,
    make_optimizer,
    state_shardings,
    train_step_fn,
)
from torch_reference import build_torch_transformer, jax_config, reference_segments, save_and_read_state  # noqa: E402


def torch_step_fn(model, segments, input_ids, x0, mask, sigma, optimizer):
    """One eager torch step on a fixed batch: forward on x_σ, masked velocity MSE, backward, clip, AdamW."""
    n_vision = len(segments["vision_mse_loss_indexes"])
    x0_t, mask_t = torch.as_tensor(x0), torch.as_tensor(mask)
    ids = torch.as_tensor(input_ids, dtype=torch.long)

    def step() -> float:
        eps = torch.randn_like(x0_t)
        x_sigma = torch.where(mask_t > 0, sigma * eps + (1 - sigma) * x0_t, x0_t)
        (vision,), _, _ = model(
            input_ids=ids, text_indexes=segments["text_indexes"], position_ids=segments["position_ids"],
            und_len=segments["und_len"], sequence_length=segments["sequence_length"], vision_tokens=[x_sigma],
            vision_token_shapes=segments["vision_token_shapes"],
            vision_sequence_indexes=segments["vision_sequence_indexes"],
            vision_mse_loss_indexes=segments["vision_mse_loss_indexes"],
            vision_timesteps=torch.full((n_vision,), sigma * 1000.0),
            vision_noisy_frame_indexes=segments["vision_noisy_frame_indexes"], return_dict=False,
        )
        loss = 10 * (((vision - (eps - x0_t)[0]) ** 2) * mask_t[0]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    return step


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--latent", type=int, nargs=3, default=(4, 16, 16))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    style = dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 32, num_key_value_heads=max(1, args.hidden // 128), head_dim=32,
                 rope_axes_dim=[6, 5, 5], vocab_size=1000, hidden_act="silu", rms_norm_eps=1e-6,
                 qk_norm_for_text=True, use_und_k_norm_for_gen=False, rope_theta=5_000_000.0)
    torch_model = build_torch_transformer(style, seed=0).train()
    cfg = jax_config(torch_model)
    rng = np.random.default_rng(0)
    latent, fps, sigma = tuple(args.latent), 24.0, 0.7
    input_ids = rng.integers(0, cfg.vocab_size, args.text)
    x0 = rng.standard_normal((1, cfg.latent_channel, *latent)).astype(np.float32)
    layout = layout_sequence(cfg, args.text, latent, fps=fps, clean_vision_frames=[0])
    mask = np.broadcast_to(layout.vision_noisy[None, None, :, None, None], x0.shape).astype(np.float32).copy()
    tokens = args.text + layout.num_vision

    segments = reference_segments(torch_model, args.text, latent, fps, [0])
    t_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, weight_decay=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        state_np = save_and_read_state(torch_model, tmp)
    torch_time = best_time(torch_step_fn(torch_model, segments, input_ids, x0, mask, sigma, t_opt), args.repeats)

    model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla")
    params = params_from_torch_state(state_np, cfg, model.abstract_params())
    optim = OptimConfig(lr=1e-4, warmup_steps=0, total_steps=1000, freeze_reasoner=False)
    optimizer = make_optimizer(optim, params)
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    state = init_state(jax.tree.map(jnp.asarray, params), optimizer, optim, seed=0)
    abstract = jax.eval_shape(lambda: state)
    shardings = state_shardings(abstract, param_shardings(abstract.params, mesh, load_mesh_preset("tiny").rules),
                                optimizer, mesh)
    gen = GeneratorInputs(position_ids=batch_generator_positions([layout]), vision=x0,
                          vision_noisy=layout.vision_noisy[None], vision_t=np.zeros(1, np.float32))
    batch = jax.tree.map(jnp.asarray, TrainBatch(text=batch_text([input_ids], [layout]), gen=gen))
    step = jit_train_step(train_step_fn(model, optimizer, LossConfig(), optim), shardings,
                          batch_shardings(batch, mesh), mesh)
    holder = {"state": jax.device_put(state, shardings)}

    def jax_step() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    jax_step()
    compile_s = time.perf_counter() - start
    jax_time = best_time(jax_step, args.repeats)
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "torch_threads": torch.get_num_threads(),
        "config": {"layers": args.layers, "hidden": args.hidden, "text_tokens": args.text,
                   "vision_tokens": layout.num_vision, "batch": 1, "dtype": "float32"},
        "jax_step_s": jax_time, "jax_tokens_per_s": tokens / jax_time, "jax_compile_s": compile_s,
        "torch_step_s": torch_time, "torch_tokens_per_s": tokens / torch_time,
        "speedup_jax_over_torch": torch_time / jax_time,
    }, indent=1))


if __name__ == "__main__":
    main()

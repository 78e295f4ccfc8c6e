"""Jitted JAX transformer forward vs diffusers' eager Cosmos3OmniTransformer, same weights, one process.

    python tools/bench_forward.py [--layers 4] [--hidden 512] [--text 256] [--frames 12] [--repeats 3]
    python tools/bench_forward.py --breakdown     # where one layer's time goes, piece by piece (no torch)
    python tools/bench_forward.py --matmul-dtypes # f32 vs bf16 matmuls and the bf16 vs f32 joint forward

Reports seconds per forward, GFLOP/s (dense matmul + unmasked attention FLOPs), the fraction of this machine's
fp32 matmul ceiling (measured in the same run), the JAX/torch speed ratio, and the cached generator-only step
(`denoise_step` against a reasoner K/V cache) against the full joint step. `--breakdown` times the pieces of one
joint layer at the same shapes instead (attention passes, projections, MLP, norms, rope, and the attention's
own matmuls and softmax alone), interleaved with the ceiling. `--matmul-dtypes` times an [M,K]x[K,N] matmul at
the forward's shapes (M = all tokens, K = hidden, N = the MLP width; and the 2048^3 ceiling shape) in f32, bf16
inputs accumulated in f32 (`preferred_element_type=float32`) and bf16 -> bf16, reads from the optimized HLO
whether XLA keeps the bf16 operands or converts them to f32 first, and times the bf16 joint forward against the
f32 one (same weights rounded to bf16, same process, the f32 ceiling measured alongside).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
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
from torch_reference import (  # noqa: E402
    build_torch_transformer,
    jax_config,
    reference_forward,
    reference_segments,
    save_and_read_state,
)


def model_flops(cfg, und_len: int, gen_len: int) -> tuple[float, float]:
    """(total, reasoner share) of matmul FLOPs for one joint forward, counting only unmasked attention."""
    d, hd, h, k, inter = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    proj = 2 * d * hd * (2 * h + 2 * k)
    mlp = 2 * d * inter * (3 if cfg.hidden_act == "silu" else 2)
    per_token = proj + mlp
    und_attn = 4 * h * hd * und_len * (und_len + 1) / 2
    gen_attn = 4 * h * hd * gen_len * (und_len + gen_len)
    reasoner = cfg.num_hidden_layers * (und_len * per_token + und_attn)
    generator = cfg.num_hidden_layers * (gen_len * per_token + gen_attn) + 2 * gen_len * 2 * d * cfg.patch_latent_dim
    return reasoner + generator, reasoner


def matmul_ceiling(repeats: int = 5) -> float:
    """fp32 GFLOP/s of a 2048^3 XLA matmul on this machine (the compute ceiling the forward is judged against)."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * 2048**3 / best / 1e9


def breakdown(cfg, und_len: int, gen_len: int, repeats: int) -> None:
    """Print a table of one joint layer's pieces at the benchmark shapes, each timed alone (fp32, jitted)."""
    from pallas_kernels.xla import blocked

    from cosmos_jax.modeling.norms import RMSNorm
    from cosmos_jax.modeling.rope import apply_rope

    key = iter(jax.random.split(jax.random.key(0), 32))
    normal = lambda *shape: jax.random.normal(next(key), shape, jnp.float32)  # noqa: E731
    d, hd, h, k, inter = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    tokens, rows = und_len + gen_len, 64 * (h // k)
    q_gen, q_und = normal(1, gen_len, h, hd), normal(1, und_len, h, hd)
    kv_und, kv_gen = normal(1, und_len, k, hd), normal(1, gen_len, k, hd)
    lens = (jnp.array([und_len]), jnp.array([gen_len]))
    x, w_qkv, w_o = normal(1, tokens, d), normal(d, hd * (h + 2 * k)), normal(h * hd, d)
    w_gate, w_up, w_down = normal(d, inter), normal(d, inter), normal(inter, d)
    norm = RMSNorm(cfg.rms_norm_eps)
    norm_params, head_norm_params = norm.init(jax.random.key(0), x), norm.init(jax.random.key(0), q_gen)
    cos, sin = normal(1, tokens, hd), normal(1, tokens, hd)
    q_rows, k_t, v_rows = normal(rows, hd), normal(hd, tokens), normal(tokens, hd)
    logits = normal(rows, tokens)
    tiles = k * -(-gen_len // 64)  # the blocked path's (query tile, kv head) matmul pairs per layer
    attn_flops = 4 * h * hd * gen_len * tokens
    def norms(x, q, k):
        return (norm.apply(norm_params, x), norm.apply(norm_params, x), norm.apply(head_norm_params, q),
                norm.apply(head_norm_params, k))

    def repeated(fn, a, b):
        """`tiles` calls of fn(a, b) in a loop, each made to depend on the last so none is merged or hoisted."""
        def body(_, total):
            out = fn(a, b + total * 0.0)
            return total + out.reshape(-1)[0]
        return jax.lax.fori_loop(0, tiles, body, jnp.float32(0))

    def softmax(s, _):
        return jnp.sum(jnp.exp2(s - jnp.max(s, -1, keepdims=True)), -1)

    pieces = {  # name: (function, arguments, FLOPs)
        "generator attention (blocked)": (blocked.generator_attention, (q_gen, kv_und, kv_und, kv_gen, kv_gen, *lens),
                                          attn_flops),
        "reasoner attention (blocked)": (blocked.reasoner_attention, (q_und, kv_und, kv_und, lens[0]),
                                         4 * h * hd * und_len * (und_len + 1) / 2),
        "  its q·kᵀ matmuls alone": (functools.partial(repeated, jnp.matmul), (q_rows, k_t), attn_flops / 2),
        "  its p·v matmuls alone": (functools.partial(repeated, jnp.matmul), (logits, v_rows), attn_flops / 2),
        "  its softmax alone (max, exp2, sum)": (
            functools.partial(repeated, lambda s, b: softmax(s + b, None)), (logits, jnp.float32(0)), 0),
        "q/k/v + o projections": (lambda x, a, b: (x @ a, x[:, :, : h * hd] @ b), (x, w_qkv, w_o),
                                  2 * tokens * d * hd * (2 * h + 2 * k)),
        "MLP (SwiGLU)": (lambda x, g, u, w: (jax.nn.silu(x @ g) * (x @ u)) @ w, (x, w_gate, w_up, w_down),
                         6 * tokens * d * inter),
        "RMSNorms (input, post-attention, q, k)": (norms, (x, q_gen, kv_gen), 0),
        "rope (q and k)": (lambda q, k, c, s: (apply_rope(q, c, s), apply_rope(k, c, s)),
                           (q_gen, kv_gen, cos[:, :gen_len], sin[:, :gen_len]), 0),
    }
    square = jnp.ones((2048, 2048), jnp.float32)
    pieces["ceiling"] = (lambda a: a @ a, (square,), 2 * 2048**3)
    compiled = {name: functools.partial(jax.jit(fn), *args) for name, (fn, args, _) in pieces.items()}
    for fn in compiled.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            times[name].append(_timed(lambda: jax.block_until_ready(fn())))
    best = {name: min(t) for name, t in times.items()}
    ceiling = 2 * 2048**3 / best.pop("ceiling") / 1e9
    layer = sum(best[name] for name in best if not name.startswith("  "))
    print(f"fp32 matmul ceiling (XLA 2048^3): {ceiling:.0f} GFLOP/s; {und_len} text + {gen_len} generator tokens\n")
    print("| piece of one joint layer | ms | share of the layer | GFLOP/s | of ceiling |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in best.items():
        flops = pieces[name][2]
        rate = f"{flops / seconds / 1e9:.0f} | {flops / seconds / 1e9 / ceiling:.0%}" if flops else "– | –"
        share = "" if name.startswith("  ") else f"{seconds / layer:.0%}"
        print(f"| {name} | {seconds * 1e3:.1f} | {share} | {rate} |")


MATMUL_DTYPES = {  # name: (input dtype, the dot's preferred element type)
    "f32": (jnp.float32, None),
    "bf16 in, f32 accumulate": (jnp.bfloat16, jnp.float32),
    "bf16 -> bf16": (jnp.bfloat16, None),
}


def hlo_dot_operands(compiled_text: str) -> str:
    """What the optimized HLO of a bf16 matmul multiplies: "converted to f32" when it holds a convert to f32
    (XLA upcasts the inputs, multiplies in f32), else "bf16 operands" (the dot reads bf16 itself)."""
    upcast = re.search(r"= f32\[[^\]]*\]\{[^}]*\} convert\(", compiled_text)
    return "converted to f32" if upcast else "bf16 operands"


def matmul_dtypes(shapes: list[tuple[int, int, int]], repeats: int) -> None:
    """Print GFLOP/s of x[M,K] @ w[K,N] per dtype setting (MATMUL_DTYPES), interleaved, best of `repeats`."""
    cases = {}
    for m, k, n in shapes:
        for name, (dtype, accumulate) in MATMUL_DTYPES.items():
            x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(dtype)
            w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(dtype)
            fn = jax.jit(functools.partial(jnp.matmul, preferred_element_type=accumulate))
            compiled = fn.lower(x, w).compile()
            jax.block_until_ready(compiled(x, w))
            operands = "f32" if dtype == jnp.float32 else hlo_dot_operands(compiled.as_text())
            cases[(m, k, n, name)] = (functools.partial(compiled, x, w), operands)
    times = {key: [] for key in cases}
    for _ in range(repeats):
        for key, (fn, _) in cases.items():
            times[key].append(_timed(lambda: jax.block_until_ready(fn())))
    print("| [M,K]x[K,N] | dtypes | ms | GFLOP/s | vs f32 | what the optimized HLO multiplies |")
    print("|---|---|---:|---:|---:|---|")
    for (m, k, n, name), (_, operands) in cases.items():
        seconds, f32 = min(times[(m, k, n, name)]), min(times[(m, k, n, "f32")])
        print(f"| {m}x{k} x {k}x{n} | {name} | {seconds * 1e3:.2f} | {2 * m * k * n / seconds / 1e9:.0f} | "
              f"{f32 / seconds:.2f}x | {operands} |")


@contextlib.contextmanager
def linears_accumulating_in_f32():
    """Inside, every `jax.lax.dot_general` of two bf16 operands without a preferred type (the Flax Dense layer
    linears) asks for an f32 result and rounds it to bf16: the same math, through XLA:CPU's bf16 kernel.
    A measurement only: the model itself is unchanged."""
    original = jax.lax.dot_general

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        if preferred_element_type is None and lhs.dtype == rhs.dtype == jnp.bfloat16:
            out = original(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32,
                           **kwargs)
            return out.astype(jnp.bfloat16)
        return original(lhs, rhs, dimension_numbers, precision=precision,
                        preferred_element_type=preferred_element_type, **kwargs)

    jax.lax.dot_general = dot_general
    try:
        yield
    finally:
        jax.lax.dot_general = original


def forward_dtypes(cfg, params, text, gen, flops: float, repeats: int) -> None:
    """The joint forward in f32, in bf16 (weights rounded to bf16) and in bf16 with the layer linears accumulating
    in f32 (`linears_accumulating_in_f32`), alternated; seconds, GFLOP/s and the distance to the f32 output."""
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                               params)
    runs = {}
    for name, dtype, p, patched in (("f32", jnp.float32, params, False), ("bf16", jnp.bfloat16, bf16_params, False),
                                    ("bf16, linears bf16 x bf16 -> f32", jnp.bfloat16, bf16_params, True)):
        with linears_accumulating_in_f32() if patched else contextlib.nullcontext():
            compiled = jax.jit(Cosmos3Transformer(cfg, dtype=dtype).__call__).lower(p, text, gen).compile()
        out = compiled(p, text, gen).vision.block_until_ready()
        runs[name] = (functools.partial(compiled, p, text, gen), np.asarray(out, np.float32))
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, _) in runs.items():
            times[name].append(_timed(lambda: fn().vision.block_until_ready()))
    reference = runs["f32"][1]
    print("\n| joint forward | seconds | GFLOP/s | vs f32 | max abs diff to f32 / scale |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, out) in runs.items():
        seconds = min(times[name])
        diff = float(np.abs(out - reference).max() / np.abs(reference).max())
        print(f"| {name} | {seconds:.3f} | {flops / seconds / 1e9:.0f} | {min(times['f32']) / seconds:.2f}x | "
              f"{diff:.1e} |")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--text", type=int, default=256, help="reasoner (prompt) tokens")
    parser.add_argument("--frames", type=int, default=12, help="latent frames of 32x32 latents (256 tokens each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="auto", help="JAX attention implementation")
    parser.add_argument("--breakdown", action="store_true", help="time one layer's pieces instead (no torch)")
    parser.add_argument("--matmul-dtypes", action="store_true",
                        help="time f32 / bf16 matmuls and the bf16 joint forward against the f32 one instead")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    head_dim = 64
    style = dict(
        hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=head_dim,
        rope_axes_dim=[12, 10, 10], vocab_size=1024, hidden_act="silu", qk_norm_for_text=True,
    )
    model = build_torch_transformer(style, seed=0)
    cfg = jax_config(model)
    if args.breakdown:
        breakdown(cfg, args.text, args.frames * 256, max(args.repeats, 5))
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = save_and_read_state(model, tmp)
    latent = (args.frames, 32, 32)
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, cfg.vocab_size, size=args.text)
    latents = rng.standard_normal((1, cfg.latent_channel, *latent)).astype(np.float32)
    segments = reference_segments(model, args.text, latent, 24.0, [0])

    jmodel = Cosmos3Transformer(cfg, dtype=jnp.float32, attention=args.attention)
    params = jax.tree.map(jnp.asarray, params_from_torch_state(state, cfg, jmodel.abstract_params()))
    layout = layout_sequence(cfg, args.text, latent, fps=24.0, clean_vision_frames=[0])
    text = jax.tree.map(jnp.asarray, batch_text([input_ids], [layout]))
    gen = GeneratorInputs(
        position_ids=jnp.asarray(batch_generator_positions([layout])), vision=jnp.asarray(latents),
        vision_noisy=jnp.asarray(layout.vision_noisy)[None], vision_t=jnp.full((1,), 973.0),
    )
    if args.matmul_dtypes:
        tokens = args.text + layout.num_gen
        print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}); "
              f"{args.text} text + {layout.num_gen} generator tokens, hidden {args.hidden}")
        print(f"fp32 matmul ceiling (XLA 2048^3): {matmul_ceiling():.0f} GFLOP/s\n")
        matmul_dtypes([(tokens, args.hidden, 3 * args.hidden), (2048, 2048, 2048)], max(args.repeats, 5))
        forward_dtypes(cfg, params, text, gen, model_flops(cfg, args.text, layout.num_gen)[0], args.repeats)
        print(f"fp32 matmul ceiling again: {matmul_ceiling():.0f} GFLOP/s")
        return
    full = jax.jit(jmodel.__call__)
    encode = jax.jit(jmodel.encode_reasoner)
    step = jax.jit(jmodel.denoise_step)

    compile_start = time.perf_counter()
    jax_out = full(params, text, gen).vision.block_until_ready()
    cache, _ = encode(params, text)
    step(params, cache, gen).vision.block_until_ready()
    compile_s = time.perf_counter() - compile_start

    torch_out = reference_forward(model, segments, input_ids, latents, 973)[0]
    err = float(np.abs(np.asarray(jax_out[0]) - torch_out).max() / np.abs(torch_out).max())

    t_torch = min(_timed(lambda: reference_forward(model, segments, input_ids, latents, 973)) for _ in range(args.repeats))
    # Alternate the two JAX calls so machine noise hits both alike.
    full_times, step_times = [], []
    for _ in range(args.repeats):
        step_times.append(_timed(lambda: step(params, cache, gen).vision.block_until_ready()))
        full_times.append(_timed(lambda: full(params, text, gen).vision.block_until_ready()))
    t_full, t_step = min(full_times), min(step_times)
    ceiling = matmul_ceiling()

    total, reasoner = model_flops(cfg, args.text, layout.num_gen)
    gflops = lambda seconds, flops=total: flops / seconds / 1e9  # noqa: E731
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print(f"config: {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads x {head_dim}, "
          f"{args.text} text + {layout.num_gen} generator tokens; attention={args.attention}; fp32")
    print(f"parity (fp32, max abs / scale): {err:.2e}; JAX compile (full + encode + step): {compile_s:.1f} s")
    print(f"fp32 matmul ceiling (XLA 2048^3): {ceiling:.0f} GFLOP/s\n")
    print("| forward | seconds | GFLOP/s | of ceiling | speed vs diffusers |")
    print("|---|---:|---:|---:|---:|")
    print(f"| diffusers eager (torch) | {t_torch:.3f} | {gflops(t_torch):.0f} | {gflops(t_torch) / ceiling:.0%} | 1.00x |")
    print(f"| JAX jitted joint forward | {t_full:.3f} | {gflops(t_full):.0f} | {gflops(t_full) / ceiling:.0%} | "
          f"{t_torch / t_full:.2f}x |")
    gen_flops = total - reasoner
    print(f"| JAX cached generator step | {t_step:.3f} | {gflops(t_step, gen_flops):.0f} | "
          f"{gflops(t_step, gen_flops) / ceiling:.0%} | {t_torch / t_step:.2f}x |")
    print(f"\ncached step / full step time: {t_step / t_full:.3f} (reasoner share of FLOPs: {reasoner / total:.3f}, "
          f"so the ideal is {1 - reasoner / total:.3f})")


if __name__ == "__main__":
    main()

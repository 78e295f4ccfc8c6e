"""Benchmark the Cosmos 3 joint attention: Pallas kernel, XLA reference, blocked XLA, jax.nn.dot_product_attention.

    python tools/bench_attention.py            # Nano-like shapes on the default backend
    python tools/bench_attention.py --smoke    # tiny shapes (CPU), correctness + a 3k-token CPU speed table

FLOP counts include only unmasked work: 4·H·D per visible (query, key) pair, i.e. causal pairs for the reasoner
and Lg·(Lu+Lg) pairs for the generator (×3.5 with --backward). On CPU the Pallas kernel runs in interpret mode and
is only checked for correctness; speed is reported for blocked_xla, the reference and dot_product_attention, with
a plain fp32 matmul measured in the same run as the ceiling. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.xla import blocked as blocked_xla
from pallas_kernels import joint_attention as pallas_attention
from pallas_kernels.reference import generator_attention_reference, reasoner_attention_reference
from timing import median_seconds


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: the reasoner (causal, und tokens) or generator (gen over und + gen tokens) pass."""

    name: str
    kind: str  # "reasoner" | "generator"
    batch: int
    und: int
    gen: int
    heads: int
    kv_heads: int
    head_dim: int

    def flops(self) -> float:
        """Forward FLOPs over visible (query, key) pairs only."""
        if self.kind == "reasoner":
            pairs = self.und * (self.und + 1) / 2
        else:
            pairs = self.gen * (self.und + self.gen)
        return 4.0 * self.batch * self.heads * self.head_dim * pairs

    def logits_bytes(self) -> int:
        """Bytes of one f32 logits tensor of a dense implementation."""
        q_len = self.und if self.kind == "reasoner" else self.gen
        k_len = self.und if self.kind == "reasoner" else self.und + self.gen
        return 4 * self.batch * self.heads * q_len * k_len


def make_inputs(case: Case, dtype, seed: int = 0) -> tuple[jax.Array, ...]:
    """Random q/k/v (and lengths = full) for a case, in the argument order of the reference."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32).astype(dtype)
    b, h, k, d = case.batch, case.heads, case.kv_heads, case.head_dim
    und_len = jnp.full((b,), case.und, jnp.int32)
    if case.kind == "reasoner":
        return normal(b, case.und, h, d), normal(b, case.und, k, d), normal(b, case.und, k, d), und_len
    gen_len = jnp.full((b,), case.gen, jnp.int32)
    return (
        normal(b, case.gen, h, d), normal(b, case.und, k, d), normal(b, case.und, k, d),
        normal(b, case.gen, k, d), normal(b, case.gen, k, d), und_len, gen_len,
    )


def _dot_product_attention(case: Case, implementation: str | None) -> Callable[..., jax.Array]:
    """jax.nn.dot_product_attention with the joint-attention semantics (GQA native, explicit generator mask)."""
    if case.kind == "reasoner":
        return lambda q, k, v, und_len: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=und_len, key_value_seq_lengths=und_len,
            implementation=implementation,
        )

    def generator(q, ku, vu, kg, vg, und_len, gen_len):
        keys, values = jnp.concatenate([ku, kg], axis=1), jnp.concatenate([vu, vg], axis=1)
        key_valid = jnp.concatenate(
            [jnp.arange(case.und)[None] < und_len[:, None], jnp.arange(case.gen)[None] < gen_len[:, None]], axis=1
        )
        mask = key_valid[:, None, None, :] & (jnp.arange(case.gen)[None, :] < gen_len[:, None])[:, None, :, None]
        return jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation=implementation)

    return generator


def implementations(case: Case, backend: str) -> dict[str, Callable[..., jax.Array]]:
    """Every implementation of the case's pass to time on this backend."""
    reasoner = case.kind == "reasoner"
    impls = {
        "blocked_xla": blocked_xla.reasoner_attention if reasoner else blocked_xla.generator_attention,
        "xla reference": reasoner_attention_reference if reasoner else generator_attention_reference,
        "dot_product_attention (xla)": _dot_product_attention(case, "xla"),
    }
    if backend != "cpu":
        impls = {"pallas kernel": pallas_attention.reasoner_attention if reasoner
                 else pallas_attention.generator_attention, **impls}
    if backend == "gpu":
        impls["dot_product_attention (cudnn)"] = _dot_product_attention(case, "cudnn")
    return impls


def _with_backward(fn: Callable[..., jax.Array], num_float: int) -> Callable[..., tuple[jax.Array, ...]]:
    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32))

    return jax.grad(loss, argnums=tuple(range(num_float)))


def time_call(fn: Callable[..., object], args: tuple, iters: int) -> float:
    """Median wall time in seconds of a jitted call (after one compile + warm-up call)."""
    compiled = jax.jit(fn)
    jax.block_until_ready(compiled(*args))
    return median_seconds(lambda: jax.block_until_ready(compiled(*args)), iters)


def matmul_ceiling(iters: int) -> float:
    """fp32 4096² matmul FLOP/s measured now (the CPU ceiling under the current load)."""
    a = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
    return 2 * 4096**3 / time_call(lambda x: x @ x, (a,), iters)


def bench_case(case: Case, dtype, backend: str, iters: int, backward: bool, memory_limit: float) -> list[dict]:
    """Rows of the table for one case; dense implementations whose logits would not fit are skipped."""
    args = make_inputs(case, dtype)
    num_float = 3 if case.kind == "reasoner" else 5
    reference = reasoner_attention_reference if case.kind == "reasoner" else generator_attention_reference
    dense_fits = 3 * case.logits_bytes() < memory_limit
    expected = jax.jit(reference)(*args).astype(jnp.float32) if dense_fits else None
    flops = case.flops() * (3.5 if backward else 1.0)
    rows = []
    for name, fn in implementations(case, backend).items():
        dense = name.startswith(("xla reference", "dot_product_attention (xla)"))
        if dense and not dense_fits:
            rows.append(dict(case=case.name, impl=name, ms=None, rate=None, err=None, note="skipped: logits OOM"))
            continue
        try:
            call = _with_backward(fn, num_float) if backward else fn
            seconds = time_call(call, args, iters)
            err = None
            if expected is not None and not backward:
                err = float(jnp.max(jnp.abs(jax.jit(fn)(*args).astype(jnp.float32) - expected)))
            rows.append(dict(case=case.name, impl=name, ms=seconds * 1e3, rate=flops / seconds, err=err, note=""))
        except Exception as error:  # noqa: BLE001 - report unsupported backends in the table, keep going
            rows.append(dict(case=case.name, impl=name, ms=None, rate=None, err=None,
                             note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"))
    return rows


def check_pallas_small(dtype, backend: str) -> list[dict]:
    """Correctness of the Pallas kernel (interpreted on CPU) on tiny shapes, forward and gradients vs the reference."""
    cases = [
        Case("smoke reasoner", "reasoner", 2, 45, 0, 8, 2, 64),
        Case("smoke generator", "generator", 2, 21, 70, 8, 2, 128),
    ]
    rows = []
    for case in cases:
        args = make_inputs(case, dtype, seed=1)
        args = args[:-1] + (args[-1].at[0].set(args[-1][0] // 2),)  # one row with padding
        kernel = pallas_attention.reasoner_attention if case.kind == "reasoner" else pallas_attention.generator_attention
        reference = reasoner_attention_reference if case.kind == "reasoner" else generator_attention_reference
        num_float = 3 if case.kind == "reasoner" else 5
        out_err = float(jnp.max(jnp.abs(kernel(*args).astype(jnp.float32) - reference(*args).astype(jnp.float32))))
        grads = jax.jit(_with_backward(kernel, num_float))(*args)
        ref_grads = jax.jit(_with_backward(reference, num_float))(*args)
        grad_err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                       for g, r in zip(grads, ref_grads))
        impl = f"pallas kernel ({'interpret' if backend == 'cpu' else backend})"
        rows.append(dict(case=case.name, impl=impl, ms=None, rate=None, err=max(out_err, grad_err),
                         note="max abs err over output and gradients"))
    return rows


def nano_cases() -> list[Case]:
    """Nano-like shapes: 32 query heads, 8 kv heads, head_dim 128; reasoner 256–512 tokens; generator 4k/16k/44k."""
    cases = [Case(f"reasoner {n}", "reasoner", 1, n, 0, 32, 8, 128) for n in (256, 512)]
    cases += [Case(f"generator {g // 1024}k + und 512", "generator", 1, 512, g, 32, 8, 128)
              for g in (4096, 16384, 45056)]
    return cases


def cpu_cases() -> list[Case]:
    """3k-token CPU cases at head_dim 64 and 128 (8 query heads, 2 kv heads)."""
    cases = []
    for d in (64, 128):
        cases.append(Case(f"reasoner 3072 causal d={d}", "reasoner", 1, 3072, 0, 8, 2, d))
        cases.append(Case(f"generator 3072 + und 256 d={d}", "generator", 1, 256, 3072, 8, 2, d))
    return cases


def print_table(rows: list[dict], unit: str, title: str) -> None:
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    print(f"\n{title}\n")
    print(f"| case | implementation | time (ms) | {unit} | max abs err vs reference | note |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        ms = f"{row['ms']:.2f}" if row["ms"] is not None else "—"
        rate = f"{row['rate'] / scale:.2f}" if row["rate"] is not None else "—"
        err = f"{row['err']:.2e}" if row["err"] is not None else "—"
        print(f"| {row['case']} | {row['impl']} | {ms} | {rate} | {err} | {row['note']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and the CPU 3k-token table")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="input dtype (default bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward + backward (FLOPs × 3.5)")
    args = parser.parse_args()
    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    device = jax.devices()[0]
    print(f"backend {backend}, device {device.device_kind}, dtype {dtype.name}, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    if backend == "cpu" or args.smoke:
        print_table(check_pallas_small(dtype, backend), "GFLOP/s", "Pallas kernel correctness on small shapes")
    if backend == "cpu":
        ceiling = matmul_ceiling(args.iters)
        print(f"\nfp32 4096x4096 matmul now: {ceiling / 1e9:.1f} GFLOP/s (ceiling under the current load)")
        cases = cpu_cases() if not args.smoke else [Case("smoke 3k generator d=64", "generator", 1, 256, 3072, 8, 2, 64)]
        rows = [r for c in cases for r in bench_case(c, dtype, backend, args.iters, args.backward, 8e9)]
        print_table(rows, "GFLOP/s", "CPU speed (blocked_xla vs reference vs dot_product_attention)")
        return
    memory = device.memory_stats().get("bytes_limit", 16e9) if device.memory_stats() else 16e9
    cases = nano_cases() if not args.smoke else [Case("smoke generator", "generator", 1, 256, 1024, 32, 8, 128)]
    rows = [r for c in cases for r in bench_case(c, dtype, backend, args.iters, args.backward, 0.5 * memory)]
    print_table(rows, "TFLOP/s", f"Nano-like shapes on {device.device_kind}")


if __name__ == "__main__":
    main()

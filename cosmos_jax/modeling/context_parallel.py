"""Context parallelism for the generator sequence: its tokens sharded over the mesh's `context` axis.

Each context shard keeps its own generator queries and keys/values [B, Lg/c, ...]; inside `jax.shard_map` the
generator keys/values are all-gathered over `context`, and the wrapped attention function (any implementation
of `pallas_kernels.reference.generator_attention_reference`'s signature: xla, blocked, pallas) runs once per
shard. Those functions take generator keys only as long as the queries, so the other shards' generator keys are
passed in the first (reasoner) key slot, ahead of the reasoner keys: softmax does not depend on key order and
rotary has already been applied, so the result equals the unsharded attention up to summation order.

`query_chunked_generator_attention` is the same decomposition on one device: queries in rematerialised chunks
(`lax.map`), so a backward pass holds one chunk's attention at a time, as a flash kernel would.

Preconditions: every generator token is valid (gen_len == Lg, as in Cosmos3Transformer). A sequence length not
divisible by the context size falls back to the unsharded attention.
"""

from __future__ import annotations

from collections.abc import Callable
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cosmos_jax.sharding import BATCH, HEADS, KV_HEADS, ActivationSharding

CONTEXT = "context"


def _others_then(chunks: jax.Array, mine: jax.Array, reasoner: jax.Array) -> jax.Array:
    """The generator rows of every chunk but `mine`, then the reasoner rows.
    chunks [c, B, n, K, D], mine: int scalar, reasoner [B, Lu, K, D] -> [B, (c-1)*n + Lu, K, D]."""
    others = jnp.roll(chunks, -(mine + 1), axis=0)[: chunks.shape[0] - 1]  # chunks mine+1, ..., mine-1
    others = jnp.moveaxis(others, 0, 1).reshape(chunks.shape[1], -1, *chunks.shape[3:])
    return jnp.concatenate([others, reasoner], axis=1)


def _single_axis(spec: PartitionSpec) -> str | tuple[str, ...] | None:
    return spec[0] if len(spec) else None


def context_parallel_generator_attention(
    attention: Callable[..., jax.Array], sharding: ActivationSharding
) -> Callable[..., jax.Array]:
    """Wrap a generator attention function so that it runs with the generator sequence sharded over `context`.

    The returned function has the wrapped one's signature:
    (q_gen [B,Lg,H,D], k_und_for_gen [B,Lu,K,D], v_und, k_gen [B,Lg,K,D], v_gen, und_len [B], gen_len [B],
    scale=None) -> [B, Lg, H, D].
    """
    mesh = sharding.mesh
    context = mesh.shape[CONTEXT]

    def attend(q_gen, k_und_for_gen, v_und, k_gen, v_gen, und_len, gen_len, scale=None):
        batch, length, heads, _ = q_gen.shape
        kv_heads = k_gen.shape[2]
        if length % context:
            return attention(q_gen, k_und_for_gen, v_und, k_gen, v_gen, und_len, gen_len, scale)
        local = length // context
        b = _single_axis(sharding.spec((batch,), (BATCH,)))
        h = _single_axis(sharding.spec((heads,), (HEADS,)))
        h = h if h == _single_axis(sharding.spec((kv_heads,), (KV_HEADS,))) else None
        sharded, whole, rows = PartitionSpec(b, CONTEXT, h), PartitionSpec(b, None, h), PartitionSpec(b)

        def body(q, k_und, v_und_, k_loc, v_loc, und_len_, gen_len_):
            mine = jax.lax.axis_index(CONTEXT)
            keys = _others_then(jax.lax.all_gather(k_loc, CONTEXT, axis=0), mine, k_und)
            values = _others_then(jax.lax.all_gather(v_loc, CONTEXT, axis=0), mine, v_und_)
            key_len = und_len_ + (context - 1) * local
            return attention(q, keys, values, k_loc, v_loc, key_len, jnp.full_like(gen_len_, local), scale)

        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(sharded, whole, whole, sharded, sharded, rows, rows),
            out_specs=sharded,
            check_vma=False,
        )(q_gen, k_und_for_gen, v_und, k_gen, v_gen, und_len, gen_len)

    return attend


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def query_chunked_generator_attention(attention: Callable[..., jax.Array], chunk: int) -> Callable[..., jax.Array]:
    """Wrap a generator attention function to run its queries in rematerialised chunks of at most `chunk` tokens
    (the largest divisor of Lg not above it). Same signature and result as the wrapped function."""
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"query chunk must be a positive int, got {chunk!r}")

    def attend(q_gen, k_und_for_gen, v_und, k_gen, v_gen, und_len, gen_len, scale=None):
        batch, length = q_gen.shape[:2]
        size = _largest_divisor_at_most(length, chunk)
        if size == length:
            return attention(q_gen, k_und_for_gen, v_und, k_gen, v_gen, und_len, gen_len, scale)
        count = length // size

        def split(x: jax.Array) -> jax.Array:  # [B, Lg, ...] -> [count, B, size, ...]
            return jnp.moveaxis(x.reshape(batch, count, size, *x.shape[2:]), 1, 0)

        k_chunks, v_chunks = split(k_gen), split(v_gen)

        @jax.checkpoint
        def one(args: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
            index, q, k, v = args
            keys = _others_then(k_chunks, index, k_und_for_gen)
            values = _others_then(v_chunks, index, v_und)
            key_len = und_len + (count - 1) * size
            return attention(q, keys, values, k, v, key_len, jnp.full_like(gen_len, size), scale)

        out = jax.lax.map(one, (jnp.arange(count), split(q_gen), k_chunks, v_chunks))
        return jnp.moveaxis(out, 0, 1).reshape(q_gen.shape)

    return attend


def sharded_generator_attention(
    attention: Callable[..., jax.Array], sharding: ActivationSharding
) -> Callable[..., jax.Array]:
    """The generator attention to use under `sharding`: query-chunked when it sets `query_chunk`, and
    context-parallel around that when the mesh has context > 1."""
    if sharding.query_chunk is not None:
        attention = query_chunked_generator_attention(attention, sharding.query_chunk)
    if sharding.mesh.shape[CONTEXT] > 1:
        attention = context_parallel_generator_attention(attention, sharding)
    return attention

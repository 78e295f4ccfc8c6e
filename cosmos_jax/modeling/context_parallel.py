"""Context parallelism for the generator sequence: its tokens sharded over the mesh's `context` axis.

Each context shard keeps its own generator queries and keys/values [B, Lg/c, ...]; inside `jax.shard_map` the
generator keys/values are all-gathered over `context`, and the wrapped attention function (any implementation
of `pallas_kernels.reference.generator_attention_reference`'s signature: xla, blocked, pallas) runs once per
shard. Those functions take generator keys only as long as the queries, so the other shards' generator keys are
passed in the first (reasoner) key slot, ahead of the reasoner keys: softmax does not depend on key order and
rotary has already been applied, so the result equals the unsharded attention up to summation order.

Preconditions: every generator token is valid (gen_len == Lg, as in Cosmos3Transformer). A sequence length not
divisible by the context size falls back to the unsharded attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

if TYPE_CHECKING:
    from cosmos_jax.sharding import ActivationSharding

CONTEXT = "context"


def _other_shards_first(local: jax.Array, reasoner: jax.Array, context: int) -> jax.Array:
    """Inside shard_map: the generator rows of every other context shard, then the reasoner rows.
    local [B, n, K, D] (this shard's), reasoner [B, Lu, K, D] -> [B, (c-1)*n + Lu, K, D]."""
    gathered = jax.lax.all_gather(local, CONTEXT, axis=0)  # [c, B, n, K, D]
    mine = jax.lax.axis_index(CONTEXT)
    others = jnp.roll(gathered, -(mine + 1), axis=0)[: context - 1]  # shards mine+1, ..., mine-1
    others = jnp.moveaxis(others, 0, 1).reshape(local.shape[0], -1, *local.shape[2:])
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
    from cosmos_jax.sharding import BATCH, HEADS, KV_HEADS

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
            keys = _other_shards_first(k_loc, k_und, context)
            values = _other_shards_first(v_loc, v_und_, context)
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

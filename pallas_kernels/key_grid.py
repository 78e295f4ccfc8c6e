"""Index arithmetic of the sequential grid axes that the key-block (TPU) kernels walk instead of in-cell loops.

The forward and dQ kernels give each (batch row, query head, query block) one innermost 'arbitrary' grid axis of
length sum(key blocks of every source): step j folds block j of the reasoner keys while j < n_reasoner, then
block j − n_reasoner of the generator keys. Each source's BlockSpec index map clamps the step into its own block
range, so the block index repeats (and the pipeline does not fetch again) while the other source is walked; a
causal source also clamps to the last block its query block can see, so blocks above the diagonal are not fetched.
The dK/dV kernel walks (query head in the GQA group, query block) on its innermost axis the same way. In a
Pallas TPU grid, consecutive steps with the same block index reuse the buffer, and an 'arbitrary' axis runs in
order on one core, so the running softmax state in scratch is valid across it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.block_math import div


def source_offsets(counts: Sequence[int]) -> tuple[int, ...]:
    """First step of each source on the concatenated key axis: [0, n0, n0 + n1, ...]."""
    offsets, total = [], 0
    for count in counts:
        offsets.append(total)
        total += count
    return tuple(offsets)


def source_block(step: jax.Array, offset: int, count: int) -> jax.Array:
    """Block of one source that key step `step` reads: step − offset clamped to [0, count)."""
    return jnp.clip(step - offset, 0, count - 1)


def last_causal_block(q_block: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """Last key block a causal query block can see (its diagonal block)."""
    return div(q_block * block_q + (block_q - 1), block_k)


def first_causal_query_block(k_block: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """First query block a causal key block is visible to."""
    return div(k_block * block_k, block_q)


def split_group_step(step: jax.Array, query_blocks: int) -> tuple[jax.Array, jax.Array]:
    """dK/dV step -> (head within the GQA group, query block)."""
    return div(step, query_blocks), jax.lax.rem(step, jnp.int32(query_blocks))

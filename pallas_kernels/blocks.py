"""Block-size heuristics, input validation and padding helpers shared by the joint-attention kernels.

Kernels work in a [B, H, L, D] layout (heads before sequence) so that every block's last two dimensions are
(sequence, head_dim), which both Mosaic TPU and Triton tile well. Sequences are padded up to a multiple of the
block; padded keys are masked by length and padded query rows are sliced away.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

Platform = Literal["tpu", "gpu", "interpret"]

_MIN_BLOCK = 16
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query-block and key-block lengths (powers of two, at least 16)."""

    block_q: int
    block_k: int


class StreamSegments(NamedTuple):
    """Segment ids of one padded stream as a kernel reads them: ids [B, L, 1] (queries) or [B, 1, L] (keys)
    int32, and the per-block (min, max) range table [B, 2·blocks] int32 (see `pallas_kernels.block_math`)."""

    ids: jax.Array
    ranges: jax.Array


def _default_blocks(platform: Platform, head_dim: int) -> tuple[int, int]:
    """Per-backend (block_q, block_k) before clipping to the sequence lengths."""
    if platform == "tpu":
        return 512, 512
    if platform == "gpu":
        return (128, 64) if head_dim > 64 else (128, 128)
    return 64, 64


def _clip_block(block: int, length: int) -> int:
    """Shrink a block to the smallest power of two >= 16 that covers `length`, so short sequences pad little."""
    covering = max(_MIN_BLOCK, 1 << max(0, (length - 1).bit_length()))
    return min(block, covering)


def check_block(name: str, block: int) -> None:
    """Raise ValueError unless `block` is a power of two >= 16."""
    if not isinstance(block, int) or block < _MIN_BLOCK or block & (block - 1):
        raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {block!r}")


def choose_blocks(
    platform: Platform, head_dim: int, q_len: int, k_len: int, block_q: int | None, block_k: int | None
) -> BlockSizes:
    """Block sizes for one call: the caller's if given (validated), else the backend heuristic clipped to the lengths."""
    default_q, default_k = _default_blocks(platform, head_dim)
    if block_q is None:
        block_q = _clip_block(default_q, q_len)
    if block_k is None:
        block_k = _clip_block(default_k, k_len)
    check_block("block_q", block_q)
    check_block("block_k", block_k)
    return BlockSizes(block_q, block_k)


def padded_length(length: int, block: int) -> int:
    """`length` rounded up to a multiple of `block` (at least one block)."""
    return max(block, -(-length // block) * block)


def pad_sequence(x: jax.Array, length: int, axis: int) -> jax.Array:
    """Zero-pad `x` along `axis` up to `length`."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def to_heads_major(x: jax.Array, length: int) -> jax.Array:
    """[B, L, N, D] -> [B, N, length, D] with zero padding of the sequence."""
    return pad_sequence(jnp.swapaxes(x, 1, 2), length, axis=2)


def from_heads_major(x: jax.Array, length: int) -> jax.Array:
    """[B, N, Lpad, D] -> [B, length, N, D]."""
    return jnp.swapaxes(x[:, :, :length], 1, 2)


def _check_tensor(name: str, x: jax.Array, ndim: int) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_lengths(name: str, lengths: jax.Array, batch: int) -> None:
    _check_tensor(name, lengths, 1)
    if lengths.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one length per batch row), got {tuple(lengths.shape)}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {lengths.dtype}")


def _check_kv_pair(prefix: str, k: jax.Array, v: jax.Array, q: jax.Array) -> None:
    _check_tensor(f"k_{prefix}", k, 4)
    _check_tensor(f"v_{prefix}", v, 4)
    if k.shape != v.shape:
        raise ValueError(f"k_{prefix} and v_{prefix} shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    batch, _, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k_{prefix} {tuple(k.shape)} must match the queries {tuple(q.shape)} in batch and head_dim"
        )
    if heads % k.shape[2]:
        raise ValueError(f"query heads ({heads}) must be a multiple of the kv heads of k_{prefix} ({k.shape[2]})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k_{prefix}/v_{prefix} dtypes ({k.dtype}, {v.dtype}) must equal the query dtype {q.dtype}")


def _check_query(name: str, q: jax.Array) -> None:
    _check_tensor(name, q, 4)
    if jnp.dtype(q.dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype must be float32, bfloat16 or float16, got {q.dtype}")
    if q.shape[1] < 1:
        raise ValueError(f"{name} must have at least one token, got shape {tuple(q.shape)}")


def validate_reasoner(q_und: jax.Array, k_und: jax.Array, v_und: jax.Array, und_len: jax.Array) -> None:
    """Raise a clear error if the reasoner-attention inputs are inconsistent."""
    _check_query("q_und", q_und)
    _check_kv_pair("und", k_und, v_und, q_und)
    if k_und.shape[1] != q_und.shape[1]:
        raise ValueError(f"k_und length {k_und.shape[1]} must equal q_und length {q_und.shape[1]}")
    _check_lengths("und_len", und_len, q_und.shape[0])


def validate_generator(
    q_gen: jax.Array,
    k_und_for_gen: jax.Array,
    v_und: jax.Array,
    k_gen: jax.Array,
    v_gen: jax.Array,
    und_len: jax.Array,
    gen_len: jax.Array,
) -> None:
    """Raise a clear error if the generator-attention inputs are inconsistent."""
    _check_query("q_gen", q_gen)
    if not hasattr(k_und_for_gen, "shape"):
        raise TypeError(f"k_und_for_gen must be an array, got {type(k_und_for_gen).__name__}")
    _check_kv_pair("und_for_gen", k_und_for_gen, v_und, q_gen)
    _check_kv_pair("gen", k_gen, v_gen, q_gen)
    if k_gen.shape[1] != q_gen.shape[1]:
        raise ValueError(f"k_gen length {k_gen.shape[1]} must equal q_gen length {q_gen.shape[1]}")
    if k_gen.shape[2] != k_und_for_gen.shape[2]:
        raise ValueError(f"k_gen and k_und_for_gen kv heads differ: {k_gen.shape[2]} vs {k_und_for_gen.shape[2]}")
    if k_und_for_gen.shape[1] < 1:
        raise ValueError(f"k_und_for_gen must have at least one token, got shape {tuple(k_und_for_gen.shape)}")
    _check_lengths("und_len", und_len, q_gen.shape[0])
    _check_lengths("gen_len", gen_len, q_gen.shape[0])


def validate_cached(
    q: jax.Array, k: jax.Array, v: jax.Array, query_start: jax.Array, key_start: jax.Array
) -> None:
    """Raise a clear error if the inputs of a pass over a K/V cache are inconsistent."""
    _check_query("q", q)
    _check_kv_pair("cache", k, v, q)
    if k.shape[1] < 1:
        raise ValueError(f"k_cache must have at least one slot, got shape {tuple(k.shape)}")
    _check_lengths("query_start", query_start, q.shape[0])
    _check_lengths("key_start", key_start, q.shape[0])


def validate_segments(name: str, segments: jax.Array | None, shape: tuple[int, int]) -> None:
    """Raise a clear error unless `segments` is None or an integer array of `shape` ([B, L])."""
    if segments is None:
        return
    _check_tensor(name, segments, 2)
    if tuple(segments.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (batch, tokens), got {tuple(segments.shape)}")
    if not jnp.issubdtype(segments.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {segments.dtype}")


def validate_segment_pair(
    und_segment_ids: jax.Array | None, gen_segment_ids: jax.Array | None, und_shape: tuple[int, int],
    gen_shape: tuple[int, int],
) -> None:
    """Generator segment ids come in pairs: the reasoner keys' and the generator tokens', both or neither."""
    if (und_segment_ids is None) != (gen_segment_ids is None):
        raise ValueError("und_segment_ids and gen_segment_ids must be given together (both or neither)")
    validate_segments("und_segment_ids", und_segment_ids, und_shape)
    validate_segments("gen_segment_ids", gen_segment_ids, gen_shape)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(head_dim) unless given; must be a positive Python number."""
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive Python float (static), got {scale!r}")
    return float(scale)


def lengths_spec(platform: Platform, shape: tuple[int, ...]) -> pl.BlockSpec:
    """BlockSpec for the small int32 length table: SMEM on TPU, one whole block elsewhere."""
    if platform == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def compiler_params(
    platform: Platform, grid_rank: int, block_q: int, sequential: int = 0
) -> pl.CompilerParams | None:
    """Backend compiler parameters: parallel grid on TPU (the last `sequential` dimensions 'arbitrary', walked in
    order by one core), warps/stages on GPU, none when interpreting."""
    if platform == "tpu":
        semantics = ("parallel",) * (grid_rank - sequential) + ("arbitrary",) * sequential
        return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=96 * 2**20)
    if platform == "gpu":
        return plgpu.CompilerParams(num_warps=8 if block_q >= 128 else 4, num_stages=2)
    return None

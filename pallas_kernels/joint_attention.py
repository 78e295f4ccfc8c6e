"""Cosmos 3 joint attention as Pallas kernels: public API, backend dispatch and the custom VJP.

    reasoner_attention   q_und [B,Lu,H,D] attends causally to k_und/v_und [B,Lu,K,D]           -> [B,Lu,H,D]
    generator_attention  q_gen [B,Lg,H,D] attends to every valid reasoner key (k_und_for_gen, v_und) and every
                         valid generator key (k_gen, v_gen [B,Lg,K,D]), no causal mask             -> [B,Lg,H,D]
    cached_attention     q [B,T,H,D] of T new reasoner tokens attends causally to a K/V cache k/v [B,S,K,D],
                         within a per-row key window (left padding, cache slot of the first query) -> [B,T,H,D]
                         (forward only: the reasoner alone runs inference, so no backward is wired)

Semantics match `pallas_kernels.reference` (right padding by und_len/gen_len, zero rows for padded queries,
GQA head h reads kv head h // (H // K), optional segment ids for packed rows). The backend is picked when lowering: Mosaic on TPU, Triton on
CUDA/ROCm, the Pallas interpreter elsewhere (CPU) unless `interpret` says otherwise.

Two kernel layouts: the key-block grid (`pallas_kernels.forward_grid`, `pallas_kernels.backward_grid`), whose cells
hold one key block per source so VMEM use is independent of the sequence length, the default on TPU; and the
in-cell loop over whole-sequence K/V refs (`pallas_kernels.forward`, `pallas_kernels.backward`), the only one on
GPU, where a block is a window in HBM and Triton runs grid cells in no fixed order. `key_grid` picks the layout
for TPU and the interpreter (default: grid on TPU, loop in the interpreter).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import blocks as blk
from pallas_kernels.backward import dkv_call, dq_call
from pallas_kernels.backward_grid import dkv_grid_call, dq_grid_call
from pallas_kernels.block_math import PAD_SEGMENT, segment_ranges
from pallas_kernels.forward import forward_call
from pallas_kernels.forward_grid import forward_grid_call

KeyValues = tuple[tuple[jax.Array, jax.Array], ...]
Segments = tuple[jax.Array, tuple[jax.Array, ...]] | None  # (query ids [B,Lq], key ids [B,Lk] per source)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static part of one call: which sources are causal, the scale and the caller's block/backend choices."""

    causal: tuple[bool, ...]
    scale: float
    block_q: int | None
    block_k: int | None
    interpret: bool | None
    key_grid: bool | None = None
    windowed: bool = False


def _on_platform(config: _Config, fn: Callable[..., object], *args: object) -> object:
    """Run `fn(platform, *args)` with the platform chosen at lowering time (or the interpreter if asked)."""
    if config.interpret:
        return fn("interpret", *args)
    default = "interpret" if config.interpret is None else "gpu"
    return jax.lax.platform_dependent(
        *args,
        tpu=functools.partial(fn, "tpu"),
        cuda=functools.partial(fn, "gpu"),
        rocm=functools.partial(fn, "gpu"),
        default=functools.partial(fn, default),
    )


def _uses_key_grid(config: _Config, platform: blk.Platform) -> bool:
    """Whether this backend runs the key-block grid layout: never on GPU; on TPU unless key_grid=False; in the
    interpreter only if key_grid=True."""
    if platform == "gpu":
        return False
    return platform == "tpu" if config.key_grid is None else config.key_grid


def _blocks(config: _Config, platform: blk.Platform, q: jax.Array, kvs: KeyValues) -> blk.BlockSizes:
    longest_key = max(k.shape[1] for k, _ in kvs)
    return blk.choose_blocks(platform, q.shape[-1], q.shape[1], longest_key, config.block_q, config.block_k)


def _pad_kvs(kvs: KeyValues, block_k: int) -> list[tuple[jax.Array, jax.Array]]:
    """Per-source k/v [B,Lk,K,D] -> [B,K,Lk_pad,D]."""
    return [
        (blk.to_heads_major(k, blk.padded_length(k.shape[1], block_k)),
         blk.to_heads_major(v, blk.padded_length(v.shape[1], block_k)))
        for k, v in kvs
    ]


def _stream(ids: jax.Array, block: int, query: bool) -> blk.StreamSegments:
    """Segment ids [B, L] -> padded ids ([B, Lpad, 1] for queries, [B, 1, Lpad] for keys) and range table."""
    padded = jnp.pad(
        ids.astype(jnp.int32), ((0, 0), (0, blk.padded_length(ids.shape[1], block) - ids.shape[1])),
        constant_values=PAD_SEGMENT,
    )
    return blk.StreamSegments(padded[:, :, None] if query else padded[:, None, :], segment_ranges(padded, block))


def _kernel_segments(segments: Segments, sizes: blk.BlockSizes):
    if segments is None:
        return None
    q_ids, k_ids = segments
    return _stream(q_ids, sizes.block_q, True), tuple(_stream(ids, sizes.block_k, False) for ids in k_ids)


def _forward_on(
    config: _Config, platform: blk.Platform, q: jax.Array, kvs: KeyValues, lens: jax.Array, segments: Segments
) -> tuple[jax.Array, jax.Array]:
    """(o [B,Lq,H,D], lse [B,H,Lq,1] f32) on one backend."""
    sizes = _blocks(config, platform, q, kvs)
    q_len = q.shape[1]
    q_p = blk.to_heads_major(q, blk.padded_length(q_len, sizes.block_q))
    call = forward_grid_call if _uses_key_grid(config, platform) else forward_call
    o, lse = call(
        lens, q_p, _pad_kvs(kvs, sizes.block_k), causal=config.causal, blocks=sizes, scale=config.scale,
        platform=platform, segments=_kernel_segments(segments, sizes), windowed=config.windowed,
    )
    return blk.from_heads_major(o, q_len), lse[:, :, :q_len]


def _backward_on(
    config: _Config, platform: blk.Platform, q: jax.Array, kvs: KeyValues, lens: jax.Array, segments: Segments,
    do: jax.Array, lse: jax.Array, delta: jax.Array,
) -> tuple[jax.Array, KeyValues]:
    """(dq [B,Lq,H,D], ((dk, dv) [B,Lk,K,D] per source)) on one backend."""
    sizes = _blocks(config, platform, q, kvs)
    q_len = q.shape[1]
    q_pad = blk.padded_length(q_len, sizes.block_q)
    q_p, do_p = blk.to_heads_major(q, q_pad), blk.to_heads_major(do, q_pad)
    lse_p, delta_p = blk.pad_sequence(lse, q_pad, axis=2), blk.pad_sequence(delta, q_pad, axis=2)
    kvs_p = _pad_kvs(kvs, sizes.block_k)
    common = dict(blocks=sizes, scale=config.scale, platform=platform)
    streams = _kernel_segments(segments, sizes)
    grid = _uses_key_grid(config, platform)
    dq = (dq_grid_call if grid else dq_call)(
        lens, q_p, do_p, lse_p, delta_p, kvs_p, causal=config.causal, segments=streams, **common
    )
    grads = []
    for source, ((k, _), (k_p, v_p)) in enumerate(zip(kvs, kvs_p)):
        pair_lens = lens[jnp.array([0, source + 1])]
        pair = None if streams is None else (streams[0], streams[1][source])
        dk, dv = (dkv_grid_call if grid else dkv_call)(
            pair_lens, q_p, do_p, lse_p, delta_p, k_p, v_p, causal=config.causal[source], segments=pair, **common
        )
        grads.append((blk.from_heads_major(dk, k.shape[1]), blk.from_heads_major(dv, k.shape[1])))
    return blk.from_heads_major(dq, q_len), tuple(grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _joint_attention(
    config: _Config, q: jax.Array, kvs: KeyValues, lens: jax.Array, segments: Segments
) -> jax.Array:
    """q [B,Lq,H,D], kvs ((k, v) [B,Lk,K,D] per source), lens [1+S, B] int32, segments -> [B,Lq,H,D]."""
    return _on_platform(config, functools.partial(_forward_on, config), q, kvs, lens, segments)[0]


def _joint_attention_fwd(config: _Config, q: jax.Array, kvs: KeyValues, lens: jax.Array, segments: Segments):
    o, lse = _on_platform(config, functools.partial(_forward_on, config), q, kvs, lens, segments)
    return o, (q, kvs, lens, segments, o, lse)


def _joint_attention_bwd(config: _Config, residuals, do: jax.Array):
    if config.windowed:
        raise NotImplementedError("cached_attention is forward only (reasoner inference): it has no backward pass; "
                                  "differentiate the blocked XLA cached_attention instead")
    q, kvs, lens, segments, o, lse = residuals
    query_valid = jnp.arange(q.shape[1])[None, :] < lens[0][:, None]
    do = jnp.where(query_valid[:, :, None, None], do, 0).astype(q.dtype)
    delta = jnp.einsum("blhd,blhd->bhl", do.astype(jnp.float32), o.astype(jnp.float32))[..., None]
    dq, dkvs = _on_platform(
        config, functools.partial(_backward_on, config), q, kvs, lens, segments, do, lse, delta
    )
    return dq, dkvs, None, None


_joint_attention.defvjp(_joint_attention_fwd, _joint_attention_bwd)


def _length_table(lengths: Sequence[tuple[jax.Array, int]]) -> jax.Array:
    """[len(lengths), B] int32, each row clipped to its stream's padded length."""
    return jnp.stack([jnp.clip(x.astype(jnp.int32), 0, limit) for x, limit in lengths])


def reasoner_attention(
    q_und: jax.Array,
    k_und: jax.Array,
    v_und: jax.Array,
    und_len: jax.Array,
    scale: float | None = None,
    *,
    und_segment_ids: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    key_grid: bool | None = None,
) -> jax.Array:
    """Causal attention among reasoner tokens: q [B,Lu,H,D], k/v [B,Lu,K,D], und_len [B] -> [B,Lu,H,D];
    und_segment_ids [B,Lu] int (optional) restricts each query to keys of its own segment; key_grid picks the
    kernel layout on TPU and in the interpreter (see the module docstring)."""
    blk.validate_reasoner(q_und, k_und, v_und, und_len)
    blk.validate_segments("und_segment_ids", und_segment_ids, q_und.shape[:2])
    config = _Config((True,), blk.resolve_scale(scale, q_und.shape[-1]), block_q, block_k, interpret, key_grid)
    _check_config(config)
    lu = q_und.shape[1]
    lens = _length_table([(und_len, lu), (und_len, lu)])
    segments = None if und_segment_ids is None else (und_segment_ids, (und_segment_ids,))
    return _joint_attention(config, q_und, ((k_und, v_und),), lens, segments)


def generator_attention(
    q_gen: jax.Array,
    k_und_for_gen: jax.Array,
    v_und: jax.Array,
    k_gen: jax.Array,
    v_gen: jax.Array,
    und_len: jax.Array,
    gen_len: jax.Array,
    scale: float | None = None,
    *,
    und_segment_ids: jax.Array | None = None,
    gen_segment_ids: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    key_grid: bool | None = None,
) -> jax.Array:
    """Generator queries [B,Lg,H,D] over valid reasoner keys [B,Lu,K,D] and generator keys [B,Lg,K,D];
    with segment ids ([B,Lu] and [B,Lg], both or neither) a query sees only keys of its own segment; key_grid
    picks the kernel layout on TPU and in the interpreter (see the module docstring)."""
    blk.validate_generator(q_gen, k_und_for_gen, v_und, k_gen, v_gen, und_len, gen_len)
    blk.validate_segment_pair(und_segment_ids, gen_segment_ids, k_und_for_gen.shape[:2], q_gen.shape[:2])
    config = _Config((False, False), blk.resolve_scale(scale, q_gen.shape[-1]), block_q, block_k, interpret, key_grid)
    _check_config(config)
    lu, lg = k_und_for_gen.shape[1], q_gen.shape[1]
    lens = _length_table([(gen_len, lg), (und_len, lu), (gen_len, lg)])
    segments = None if gen_segment_ids is None else (gen_segment_ids, (und_segment_ids, gen_segment_ids))
    return _joint_attention(config, q_gen, ((k_und_for_gen, v_und), (k_gen, v_gen)), lens, segments)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    query_start: jax.Array,
    key_start: jax.Array,
    scale: float | None = None,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    key_grid: bool | None = None,
) -> jax.Array:
    """T new queries [B,T,H,D] over a K/V cache k/v [B,S,K,D] -> [B,T,H,D]: query i of row b sits at cache slot
    query_start[b] + i and sees the slots s with key_start[b] <= s <= query_start[b] + i (query_start, key_start
    [B] non-negative int); a query that sees no slot gives zeros. Key blocks outside a row's window are skipped.
    Forward only: differentiating it raises NotImplementedError. key_grid as in `reasoner_attention`."""
    blk.validate_cached(q, k, v, query_start, key_start)
    config = _Config((True,), blk.resolve_scale(scale, q.shape[-1]), block_q, block_k, interpret, key_grid,
                     windowed=True)
    _check_config(config)
    batch, length = q.shape[:2]
    slots = k.shape[1]
    lens = _length_table([(jnp.full((batch,), length), length), (jnp.full((batch,), slots), slots),
                          (query_start, slots), (key_start, slots)])
    return _joint_attention(config, q, ((k, v),), lens, None)


def _check_config(config: _Config) -> None:
    """Validate the caller's block sizes and interpret/key_grid flags before tracing any kernel."""
    if config.block_q is not None:
        blk.check_block("block_q", config.block_q)
    if config.block_k is not None:
        blk.check_block("block_k", config.block_k)
    if config.interpret is not None and not isinstance(config.interpret, bool):
        raise ValueError(f"interpret must be True, False or None, got {config.interpret!r}")
    if config.key_grid is not None and not isinstance(config.key_grid, bool):
        raise ValueError(f"key_grid must be True, False or None, got {config.key_grid!r}")

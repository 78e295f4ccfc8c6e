"""Joint attention implementations (Pallas kernel in interpret mode, blocked XLA) against the f32 XLA reference.

Tolerances (absolute, outputs and gradients of sum(out * P) for a random projection P):
  float32 inputs: 2e-5 forward, 1e-4 gradients (measured ≲ 3e-6);
  bfloat16 inputs vs the f32 reference on the same bf16-rounded values: 3e-2 forward, 6e-2 gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

from pallas_kernels.xla import blocked as blocked_xla
from pallas_kernels import joint_attention as pallas_attention
from pallas_kernels.reference import (
    cached_attention_reference, generator_attention_reference, reasoner_attention_reference,
)

TOLERANCES = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (3e-2, 6e-2)}

IMPLEMENTATIONS = {
    "pallas": (
        functools.partial(pallas_attention.reasoner_attention, block_q=16, block_k=16, interpret=True),
        functools.partial(pallas_attention.generator_attention, block_q=16, block_k=16, interpret=True),
    ),
    "pallas_key_grid": (
        functools.partial(pallas_attention.reasoner_attention, block_q=16, block_k=16, interpret=True, key_grid=True),
        functools.partial(pallas_attention.generator_attention, block_q=16, block_k=16, interpret=True, key_grid=True),
    ),
    "blocked_xla": (
        functools.partial(blocked_xla.reasoner_attention, block_q=16, block_k=16),
        functools.partial(blocked_xla.generator_attention, block_q=16, block_k=16),
    ),
}
MAX_EXAMPLES = {"pallas": 3, "pallas_key_grid": 1, "blocked_xla": 3}


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def _values_and_grads(fn: Callable[..., jax.Array], arrays: tuple[jax.Array, ...], lengths: tuple[jax.Array, ...],
                      projection: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """fn(*arrays, *lengths) and the gradients of sum(fn · projection) w.r.t. the float arrays, all in f32."""

    def loss(*xs):
        out = fn(*xs, *lengths)
        return jnp.sum(out.astype(jnp.float32) * projection), out

    grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(len(arrays))), has_aux=True))(*arrays)
    return out.astype(jnp.float32), tuple(g.astype(jnp.float32) for g in grads)


def _assert_matches(fn, reference, arrays, lengths, dtype, seed: int) -> None:
    projection = _normal(np.random.default_rng(seed + 1), arrays[0].shape, jnp.float32)
    out, grads = _values_and_grads(fn, arrays, lengths, projection)
    ref_arrays = tuple(x.astype(jnp.float32) for x in arrays)
    ref_out, ref_grads = _values_and_grads(reference, ref_arrays, lengths, projection)
    forward_tol, grad_tol = TOLERANCES[dtype]
    assert bool(jnp.all(jnp.isfinite(out))), "non-finite output"
    np.testing.assert_allclose(out, ref_out, atol=forward_tol, rtol=0)
    for name, g, ref_g in zip("qkvkv", grads, ref_grads):
        assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient of {name}"
        np.testing.assert_allclose(g, ref_g, atol=grad_tol, rtol=0, err_msg=f"gradient of {name}")


def _reasoner_case(seed: int, batch: int, und: int, kv_heads: int, group: int, head_dim: int, dtype, und_len):
    rng = np.random.default_rng(seed)
    heads = kv_heads * group
    arrays = (
        _normal(rng, (batch, und, heads, head_dim), dtype),
        _normal(rng, (batch, und, kv_heads, head_dim), dtype),
        _normal(rng, (batch, und, kv_heads, head_dim), dtype),
    )
    return arrays, (jnp.asarray(und_len, jnp.int32),)


def _generator_case(seed, batch, und, gen, kv_heads, group, head_dim, dtype, und_len, gen_len):
    rng = np.random.default_rng(seed)
    heads = kv_heads * group
    arrays = (
        _normal(rng, (batch, gen, heads, head_dim), dtype),
        _normal(rng, (batch, und, kv_heads, head_dim), dtype),
        _normal(rng, (batch, und, kv_heads, head_dim), dtype),
        _normal(rng, (batch, gen, kv_heads, head_dim), dtype),
        _normal(rng, (batch, gen, kv_heads, head_dim), dtype),
    )
    return arrays, (jnp.asarray(und_len, jnp.int32), jnp.asarray(gen_len, jnp.int32))


@st.composite
def _lengths(draw, batch: int, size: int, lowest: int) -> list[int]:
    return [draw(st.integers(lowest, size)) for _ in range(batch)]


@st.composite
def reasoner_cases(draw):
    batch = draw(st.integers(1, 2))
    und = draw(st.integers(1, 40))
    return dict(
        seed=draw(st.integers(0, 2**16)), batch=batch, und=und, kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 4, 8])), head_dim=draw(st.sampled_from([64, 128])),
        und_len=draw(_lengths(batch, und, 0)),
    )


@st.composite
def generator_cases(draw):
    batch = draw(st.integers(1, 2))
    und, gen = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return dict(
        seed=draw(st.integers(0, 2**16)), batch=batch, und=und, gen=gen, kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 4, 8])), head_dim=draw(st.sampled_from([64, 128])),
        und_len=draw(_lengths(batch, und, 0)), gen_len=draw(_lengths(batch, gen, 0)),
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_reasoner_matches_reference_fp32(impl: str) -> None:
    reasoner, _ = IMPLEMENTATIONS[impl]

    @settings(max_examples=MAX_EXAMPLES[impl])
    @given(reasoner_cases())
    def check(case):
        arrays, lengths = _reasoner_case(dtype=jnp.float32, **case)
        _assert_matches(reasoner, reasoner_attention_reference, arrays, lengths, jnp.float32, case["seed"])

    check()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_generator_matches_reference_fp32(impl: str) -> None:
    _, generator = IMPLEMENTATIONS[impl]

    @settings(max_examples=MAX_EXAMPLES[impl])
    @given(generator_cases())
    def check(case):
        arrays, lengths = _generator_case(dtype=jnp.float32, **case)
        _assert_matches(generator, generator_attention_reference, arrays, lengths, jnp.float32, case["seed"])

    check()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bf16_within_tolerance_of_f32_reference(impl: str) -> None:
    reasoner, generator = IMPLEMENTATIONS[impl]
    arrays, lengths = _reasoner_case(3, 2, 37, 2, 4, 128, jnp.bfloat16, [37, 20])
    _assert_matches(reasoner, reasoner_attention_reference, arrays, lengths, jnp.bfloat16, 3)
    arrays, lengths = _generator_case(4, 2, 21, 35, 2, 4, 64, jnp.bfloat16, [21, 9], [35, 17])
    _assert_matches(generator, generator_attention_reference, arrays, lengths, jnp.bfloat16, 4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_fully_padded_row_gives_zeros_and_finite_gradients(impl: str) -> None:
    reasoner, generator = IMPLEMENTATIONS[impl]
    arrays, lengths = _reasoner_case(5, 2, 19, 1, 2, 64, jnp.float32, [0, 19])
    projection = _normal(np.random.default_rng(0), arrays[0].shape, jnp.float32)
    out, grads = _values_and_grads(reasoner, arrays, lengths, projection)
    assert float(jnp.abs(out[0]).max()) == 0.0
    assert float(jnp.abs(out[1]).max()) > 0.1
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.abs(grads[0][0]).max()) == 0.0
    # Generator row 0 sees no reasoner keys (und_len 0) but its own keys; row 1 is entirely padding.
    arrays, lengths = _generator_case(6, 2, 9, 18, 1, 2, 64, jnp.float32, [0, 9], [18, 0])
    _assert_matches(generator, generator_attention_reference, arrays, lengths, jnp.float32, 6)
    out = generator(*arrays, *lengths)
    assert float(jnp.abs(out[1]).max()) == 0.0


@st.composite
def _segment_ids(draw, batch: int, size: int) -> jax.Array:
    """[batch, size] int32: packed rows (non-decreasing runs of up to 4 segments) or, sometimes, arbitrary ids."""
    rows = []
    for _ in range(batch):
        ids = draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
        rows.append(sorted(ids) if draw(st.booleans()) else ids)
    return jnp.asarray(rows, jnp.int32)


@st.composite
def segmented_cases(draw):
    batch = draw(st.integers(1, 2))
    und, gen = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return dict(
        seed=draw(st.integers(0, 2**16)), batch=batch, und=und, gen=gen, kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 4])), head_dim=64, und_len=draw(_lengths(batch, und, 0)),
        gen_len=draw(_lengths(batch, gen, 0)), und_segments=draw(_segment_ids(batch, und)),
        gen_segments=draw(_segment_ids(batch, gen)),
    )


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_segment_ids_match_reference_with_gradients(impl: str) -> None:
    """Packed rows: both passes, forward and gradients, against the reference with the same segment mask."""
    reasoner, generator = IMPLEMENTATIONS[impl]

    @settings(max_examples=MAX_EXAMPLES[impl], deadline=None)
    @given(segmented_cases())
    def check(case):
        und_seg, gen_seg = case.pop("und_segments"), case.pop("gen_segments")
        arrays, lengths = _reasoner_case(
            case["seed"], case["batch"], case["und"], case["kv_heads"], case["group"], 64, jnp.float32,
            case["und_len"],
        )
        seg = dict(und_segment_ids=und_seg)
        _assert_matches(functools.partial(reasoner, **seg), functools.partial(reasoner_attention_reference, **seg),
                        arrays, lengths, jnp.float32, case["seed"])
        arrays, lengths = _generator_case(dtype=jnp.float32, **case)
        seg = dict(und_segment_ids=und_seg, gen_segment_ids=gen_seg)
        _assert_matches(functools.partial(generator, **seg), functools.partial(generator_attention_reference, **seg),
                        arrays, lengths, jnp.float32, case["seed"])

    check()


def test_segment_ids_isolate_packed_samples() -> None:
    """Two samples packed in one row give exactly what each gives alone (the reference and both kernels)."""
    arrays, _ = _generator_case(9, 1, 24, 40, 2, 2, 64, jnp.float32, [24], [40])
    q, ku, vu, kg, vg = arrays
    und_seg = jnp.asarray([[0] * 10 + [1] * 14], jnp.int32)
    gen_seg = jnp.asarray([[0] * 15 + [1] * 25], jnp.int32)
    first = generator_attention_reference(q[:, :15], ku[:, :10], vu[:, :10], kg[:, :15], vg[:, :15],
                                          jnp.array([10]), jnp.array([15]))
    second = generator_attention_reference(q[:, 15:], ku[:, 10:], vu[:, 10:], kg[:, 15:], vg[:, 15:],
                                           jnp.array([14]), jnp.array([25]))
    alone = jnp.concatenate([first, second], axis=1)
    for _, generator in IMPLEMENTATIONS.values():
        packed = generator(q, ku, vu, kg, vg, jnp.array([24]), jnp.array([40]), und_segment_ids=und_seg,
                           gen_segment_ids=gen_seg)
        np.testing.assert_allclose(packed, alone, atol=2e-5, rtol=0)


def test_pallas_default_blocks_match_reference() -> None:
    """Default (heuristic) blocks and the automatic interpreter choice on CPU."""
    arrays, lengths = _generator_case(8, 1, 70, 150, 2, 2, 64, jnp.float32, [70], [131])
    out = pallas_attention.generator_attention(*arrays, *lengths)
    np.testing.assert_allclose(out, generator_attention_reference(*arrays, *lengths), atol=2e-5, rtol=0)


@pytest.mark.parametrize("module", [pallas_attention, blocked_xla], ids=["pallas", "blocked_xla"])
def test_bad_inputs_raise_clear_errors(module) -> None:
    arrays, (und_len,) = _reasoner_case(0, 2, 8, 2, 2, 64, jnp.float32, [8, 3])
    q, k, v = arrays
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        module.reasoner_attention(q[:, :, :3], k, v, und_len)
    with pytest.raises(ValueError, match="k_und length"):
        module.reasoner_attention(q, k[:, :5], v[:, :5], und_len)
    with pytest.raises(ValueError, match="und_len must have shape"):
        module.reasoner_attention(q, k, v, und_len[:1])
    with pytest.raises(ValueError, match="dtypes"):
        module.reasoner_attention(q, k.astype(jnp.bfloat16), v, und_len)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        module.reasoner_attention(q, k, v, und_len, block_q=24)
    with pytest.raises(ValueError, match="k_gen length"):
        module.generator_attention(q, k, v, k[:, :5], v[:, :5], und_len, und_len)
    with pytest.raises(ValueError, match=r"und_segment_ids must have shape \[2, 8\]"):
        module.reasoner_attention(q, k, v, und_len, und_segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="und_segment_ids must be an integer array"):
        module.reasoner_attention(q, k, v, und_len, und_segment_ids=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="given together"):
        module.generator_attention(q, k, v, k, v, und_len, und_len, gen_segment_ids=jnp.zeros((2, 8), jnp.int32))
    if module is pallas_attention:
        with pytest.raises(ValueError, match="key_grid must be True, False or None"):
            module.reasoner_attention(q, k, v, und_len, key_grid="tpu")


def _lower(platform: str, fn: Callable[..., object], *shapes: jax.ShapeDtypeStruct) -> str:
    checks = [
        export.DisabledSafetyCheck.custom_call("tpu_custom_call"),
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
    ]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*shapes).mlir_module()


@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_kernels_lower_for_accelerators(platform: str, marker: str) -> None:
    """Forward and backward lower to Mosaic (tpu) / Triton (cuda) custom calls from this CPU-only machine."""
    spec = jax.ShapeDtypeStruct
    b, lu, lg, h, k, d, dt = 2, 100, 300, 8, 2, 128, jnp.bfloat16
    q_und, kv_und = spec((b, lu, h, d), dt), spec((b, lu, k, d), dt)
    q_gen, kv_gen, lens = spec((b, lg, h, d), dt), spec((b, lg, k, d), dt), spec((b,), jnp.int32)

    def reasoner_grads(q, k, v, und_len):
        loss = lambda *xs: jnp.sum(pallas_attention.reasoner_attention(*xs, und_len).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def generator_grads(q, ku, vu, kg, vg, und_len, gen_len):
        loss = lambda *xs: jnp.sum(pallas_attention.generator_attention(*xs, und_len, gen_len).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, ku, vu, kg, vg)

    forward = _lower(platform, pallas_attention.reasoner_attention, q_und, kv_und, kv_und, lens)
    assert forward.count(marker) >= 1
    backward = _lower(platform, reasoner_grads, q_und, kv_und, kv_und, lens)
    assert backward.count(marker) >= 3  # forward, dQ, dK/dV
    generator = _lower(platform, generator_grads, q_gen, kv_und, kv_und, kv_gen, kv_gen, lens, lens)
    assert generator.count(marker) >= 4  # forward, dQ, dK/dV per key source

    def segmented_grads(q, ku, vu, kg, vg, und_len, gen_len, und_seg, gen_seg):
        segments = dict(und_segment_ids=und_seg, gen_segment_ids=gen_seg)
        loss = lambda *xs: jnp.sum(  # noqa: E731
            pallas_attention.generator_attention(*xs, und_len, gen_len, **segments).astype(jnp.float32)
        )
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, ku, vu, kg, vg)

    und_seg, gen_seg = spec((b, lu), jnp.int32), spec((b, lg), jnp.int32)
    segmented = _lower(platform, segmented_grads, q_gen, kv_und, kv_und, kv_gen, kv_gen, lens, lens, und_seg, gen_seg)
    assert segmented.count(marker) >= 4


@st.composite
def several_key_block_cases(draw):
    """Both sources longer than one 16-token key block (17..56 tokens: 2-4 blocks), lengths anywhere, optional
    packed segments: the shapes where the key-block grid walks several steps per source."""
    und, gen = draw(st.integers(17, 56)), draw(st.integers(17, 56))
    segmented = draw(st.booleans())
    return dict(
        seed=draw(st.integers(0, 2**16)), und=und, gen=gen, group=draw(st.sampled_from([1, 2])),
        und_len=draw(_lengths(1, und, 1)), gen_len=draw(_lengths(1, gen, 1)),
        und_segments=draw(_segment_ids(1, und)) if segmented else None,
        gen_segments=draw(_segment_ids(1, gen)) if segmented else None,
    )


@pytest.mark.slow
def test_key_grid_matches_reference_over_several_key_blocks() -> None:
    """The key-block grid layout (interpret mode), forward and gradients in fp32, on shapes needing 2-4 key
    blocks per source, against the reference (2e-5 forward, 1e-4 gradients)."""
    reasoner, generator = IMPLEMENTATIONS["pallas_key_grid"]

    @settings(max_examples=3, deadline=None)
    @given(several_key_block_cases())
    def check(case):
        und_seg, gen_seg = case["und_segments"], case["gen_segments"]
        arrays, lengths = _reasoner_case(case["seed"], 1, case["und"], 2, case["group"], 64, jnp.float32,
                                         case["und_len"])
        seg = {} if und_seg is None else dict(und_segment_ids=und_seg)
        _assert_matches(functools.partial(reasoner, **seg), functools.partial(reasoner_attention_reference, **seg),
                        arrays, lengths, jnp.float32, case["seed"])
        arrays, lengths = _generator_case(case["seed"], 1, case["und"], case["gen"], 2, case["group"], 64,
                                          jnp.float32, case["und_len"], case["gen_len"])
        seg = {} if und_seg is None else dict(und_segment_ids=und_seg, gen_segment_ids=gen_seg)
        _assert_matches(functools.partial(generator, **seg), functools.partial(generator_attention_reference, **seg),
                        arrays, lengths, jnp.float32, case["seed"])

    check()


@pytest.mark.parametrize("impl", ["pallas", "pallas_key_grid"])
def test_fully_masked_key_blocks_are_not_computed(impl: str) -> None:
    """NaN keys/values in the key blocks wholly past und_len / gen_len leave the output and every gradient
    finite and equal to the reference on zeros there: a block that is computed at all would spread the NaN
    (0 · NaN = NaN in p·V), so these blocks are skipped in the forward, dQ and dK/dV kernels."""
    _, generator = IMPLEMENTATIONS[impl]
    arrays, lengths = _generator_case(11, 1, 48, 64, 2, 2, 64, jnp.float32, [13], [20])
    q, ku, vu, kg, vg = arrays
    und_masked = jnp.arange(48)[None, :, None, None] >= 16  # und blocks 1-2 of 16: past und_len 13
    gen_masked = jnp.arange(64)[None, :, None, None] >= 32  # gen blocks 2-3: past gen_len 20
    poison = lambda x, masked: jnp.where(masked, jnp.nan, x)  # noqa: E731
    clean = lambda x, masked: jnp.where(masked, 0.0, x)  # noqa: E731
    poisoned = (q, poison(ku, und_masked), poison(vu, und_masked), poison(kg, gen_masked), poison(vg, gen_masked))
    cleaned = (q, clean(ku, und_masked), clean(vu, und_masked), clean(kg, gen_masked), clean(vg, gen_masked))
    projection = _normal(np.random.default_rng(12), q.shape, jnp.float32)
    out, grads = _values_and_grads(generator, poisoned, lengths, projection)
    ref_out, ref_grads = _values_and_grads(generator_attention_reference, cleaned, lengths, projection)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    for name, g, ref_g in zip("qkvkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref_g, atol=1e-4, rtol=0, err_msg=f"gradient of {name}")


def _pallas_calls(jaxpr) -> list:
    """Every pallas_call equation in a closed jaxpr, sub-jaxprs (platform branches, custom VJPs) included."""
    from jax._src import core

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for sub in core.jaxprs_in_params(eqn.params):
            found += _pallas_calls(sub)
    return found


def _is_backend(eqn, backend: str) -> bool:
    """Whether a pallas_call is one backend's branch ("mosaic" for TPU, "triton" for GPU), by the module its
    compiler parameters come from."""
    return backend in type(eqn.params["compiler_params"]).__module__


def _tiled_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of one block as TPU VMEM lays it out: last dim padded to 128 lanes, second-last to 8 sublanes."""
    *lead, rows, lanes = (1, *shape) if len(shape) == 1 else shape
    return int(np.prod(lead, dtype=np.int64)) * (-(-rows // 8) * 8) * (-(-lanes // 128) * 128) * itemsize


def _cell_bytes(eqn) -> tuple[int, int]:
    """(K/V bytes, all bytes) one grid cell of a pallas_call holds in VMEM: every pipelined block twice (double
    buffering) plus the scratch; SMEM tables excluded. K/V blocks are the 4-D operands with fewer heads than the
    queries' (GQA: kv heads < query heads, true at Nano's 32/8)."""
    grid_mapping = eqn.params["grid_mapping"]
    blocks = []
    for mapping in grid_mapping.block_mappings:
        aval = mapping.transformed_block_aval
        if "smem" in str(aval).lower():
            continue
        blocks.append((tuple(aval.shape), aval.dtype.itemsize, mapping.array_aval.shape))
    kernel_args = eqn.params["jaxpr"].invars
    scratch = kernel_args[len(kernel_args) - grid_mapping.num_scratch_operands:]
    total = sum(2 * _tiled_bytes(s, i) for s, i, _ in blocks)
    total += sum(_tiled_bytes(tuple(v.aval.shape), v.aval.dtype.itemsize) for v in scratch)
    query_heads = max(shape[1] for _, _, shape in blocks if len(shape) == 4)
    kv = sum(2 * _tiled_bytes(s, i) for s, i, shape in blocks if len(shape) == 4 and shape[1] < query_heads)
    return kv, total


def _nano_generator_grads(q, ku, vu, kg, vg, und_len, gen_len):
    def loss(*xs):
        return jnp.sum(pallas_attention.generator_attention(*xs, und_len, gen_len).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, ku, vu, kg, vg)


_NANO_SHAPES = (  # Nano 720p: 44,160 generator + 300 reasoner tokens, 32 query heads, 8 kv heads, head_dim 128
    jax.ShapeDtypeStruct((1, 44160, 32, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 300, 8, 128), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, 300, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 44160, 8, 128), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, 44160, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1,), jnp.int32),
    jax.ShapeDtypeStruct((1,), jnp.int32),
)
TPU_VMEM_KV_BUDGET = 16 * 2**20  # K/V blocks of one cell, double-buffered
TPU_VMEM_CELL_BUDGET = 32 * 2**20  # everything one cell holds; under the 96 MiB vmem_limit the kernels request


def test_tpu_key_grid_cells_fit_vmem_at_nano_layout() -> None:
    """At Nano's 720p layout the TPU kernels (forward, dQ, dK/dV per source) hold per grid cell ≤ 16 MiB of K/V
    blocks and ≤ 32 MiB in all, independent of the 44k sequence, and lower to Mosaic."""
    jaxpr = jax.make_jaxpr(_nano_generator_grads)(*_NANO_SHAPES)
    tpu_calls = [e for e in _pallas_calls(jaxpr.jaxpr) if _is_backend(e, "mosaic")]
    assert len(tpu_calls) == 4  # forward, dQ, dK/dV of the reasoner keys and of the generator keys
    for eqn in tpu_calls:
        kv, total = _cell_bytes(eqn)
        assert 0 < kv <= TPU_VMEM_KV_BUDGET, (eqn.params["grid_mapping"].grid, kv)
        assert total <= TPU_VMEM_CELL_BUDGET, (eqn.params["grid_mapping"].grid, total)
        assert len(eqn.params["grid_mapping"].grid) == 4  # a sequential key (or query) axis
    assert _lower("tpu", _nano_generator_grads, *_NANO_SHAPES).count("tpu_custom_call") >= 4
    loop = functools.partial(pallas_attention.generator_attention, key_grid=False)
    loop_jaxpr = jax.make_jaxpr(lambda *xs: loop(*xs))(*_NANO_SHAPES)
    loop_calls = [e for e in _pallas_calls(loop_jaxpr.jaxpr) if _is_backend(e, "mosaic")]
    assert max(_cell_bytes(e)[0] for e in loop_calls) > TPU_VMEM_KV_BUDGET  # the whole-sequence layout does not fit


def test_cuda_keeps_the_in_cell_loop_at_nano_layout() -> None:
    """On CUDA the kernels keep whole-sequence K/V refs (Triton reads block_k rows per loop step from HBM, and
    runs grid cells in no fixed order, so no sequential key axis): the 3-axis grid, lowered at Nano's layout,
    with the loop's per-step working set (one query block, one K and one V block in bf16) ≤ 128 KiB."""
    jaxpr = jax.make_jaxpr(_nano_generator_grads)(*_NANO_SHAPES)
    gpu_calls = [e for e in _pallas_calls(jaxpr.jaxpr) if _is_backend(e, "triton")]
    assert len(gpu_calls) == 8  # forward, dQ, dK/dV per source, in the cuda and in the rocm branch
    for eqn in gpu_calls:
        assert len(eqn.params["grid_mapping"].grid) == 3
    sizes = pallas_attention.blk.choose_blocks("gpu", 128, 44160, 44160, None, None)
    assert (sizes.block_q + 2 * sizes.block_k) * 128 * 2 <= 128 * 2**10
    assert _lower("cuda", _nano_generator_grads, *_NANO_SHAPES).count("__gpu$xla.gpu.triton") >= 4


CACHED_IMPLEMENTATIONS = {
    "pallas": functools.partial(pallas_attention.cached_attention, block_q=16, block_k=16, interpret=True),
    "pallas_key_grid": functools.partial(pallas_attention.cached_attention, block_q=16, block_k=16, interpret=True,
                                         key_grid=True),
    "blocked_xla": functools.partial(blocked_xla.cached_attention, block_q=16, block_k=16),
}
CACHED_CASES = {  # (batch, queries, cache slots, kv heads, group, head_dim, query_start, key_start)
    "prefill": (3, 37, 37, 2, 2, 64, [0, 0, 0], [0, 11, 30]),  # left-padded prompts, rows of no-key queries
    "decode": (3, 1, 50, 1, 4, 64, [17, 33, 49], [3, 20, 0]),  # one query per row, the slot differs per row
    "chunk": (2, 20, 45, 2, 2, 128, [0, 25], [18, 30]),  # several new tokens at an offset
}


def _cached_case(seed: int, batch, queries, slots, kv_heads, group, head_dim, query_start, key_start):
    rng = np.random.default_rng(seed)
    arrays = (
        _normal(rng, (batch, queries, kv_heads * group, head_dim), jnp.float32),
        _normal(rng, (batch, slots, kv_heads, head_dim), jnp.float32),
        _normal(rng, (batch, slots, kv_heads, head_dim), jnp.float32),
    )
    return arrays, (jnp.asarray(query_start, jnp.int32), jnp.asarray(key_start, jnp.int32))


@pytest.mark.parametrize("case", CACHED_CASES)
@pytest.mark.parametrize("impl", CACHED_IMPLEMENTATIONS)
def test_cached_attention_matches_reference_fp32(impl: str, case: str) -> None:
    """New queries over a K/V cache within each row's key window [key_start, query_start + i], GQA, several
    16-slot blocks, against the f32 reference (atol 2e-5); queries before their row's first key give zeros."""
    arrays, starts = _cached_case(20, *CACHED_CASES[case])
    out = jax.jit(CACHED_IMPLEMENTATIONS[impl])(*arrays, *starts)
    expected = cached_attention_reference(*arrays, *starts)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)
    query_slot = starts[0][:, None] + jnp.arange(arrays[0].shape[1])[None, :]
    no_keys = query_slot < starts[1][:, None]
    assert float(jnp.abs(jnp.where(no_keys[..., None, None], out, 0)).max()) == 0.0
    assert float(jnp.abs(jnp.where(no_keys[..., None, None], 0, out)).max()) > 0.1


@pytest.mark.parametrize("impl", CACHED_IMPLEMENTATIONS)
def test_cached_attention_skips_key_blocks_outside_the_window(impl: str) -> None:
    """NaN in the 16-slot blocks wholly before every row's first key (block 0) and after every row's query
    (block 3) leaves the output equal to the reference on zeros there: those blocks are never computed."""
    arrays, starts = _cached_case(21, 2, 1, 64, 2, 2, 64, [40, 35], [20, 17])
    q, k, v = arrays
    hidden = (jnp.arange(64) < 16) | (jnp.arange(64) >= 48)
    poisoned = [jnp.where(hidden[None, :, None, None], jnp.nan, x) for x in (k, v)]
    cleaned = [jnp.where(hidden[None, :, None, None], 0.0, x) for x in (k, v)]
    out = jax.jit(CACHED_IMPLEMENTATIONS[impl])(q, *poisoned, *starts)
    np.testing.assert_allclose(out, cached_attention_reference(q, *cleaned, *starts), atol=2e-5, rtol=0)


def test_cached_attention_gradients() -> None:
    """The blocked XLA pass differentiates like the reference (atol 1e-4); the Pallas pass is forward only and
    says so when differentiated."""
    arrays, starts = _cached_case(22, *CACHED_CASES["chunk"])
    _assert_matches(functools.partial(blocked_xla.cached_attention, block_q=16, block_k=16),
                    cached_attention_reference, arrays, starts, jnp.float32, 22)
    loss = lambda q: jnp.sum(CACHED_IMPLEMENTATIONS["pallas"](q, *arrays[1:], *starts))  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward only"):
        jax.grad(loss)(arrays[0])


@pytest.mark.parametrize("module", [pallas_attention, blocked_xla], ids=["pallas", "blocked_xla"])
def test_cached_attention_bad_inputs_raise_clear_errors(module) -> None:
    (q, k, v), (query_start, key_start) = _cached_case(23, *CACHED_CASES["chunk"])
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        module.cached_attention(q[:, :, :3], k, v, query_start, key_start)
    with pytest.raises(ValueError, match="query_start must have shape"):
        module.cached_attention(q, k, v, query_start[:1], key_start)
    with pytest.raises(ValueError, match="key_start must be an integer array"):
        module.cached_attention(q, k, v, query_start, key_start.astype(jnp.float32))
    with pytest.raises(ValueError, match="k_cache and v_cache shapes differ"):
        module.cached_attention(q, k, v[:, :5], query_start, key_start)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        module.cached_attention(q, k, v, query_start, key_start, block_k=24)


@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_cached_attention_lowers_for_accelerators(platform: str, marker: str) -> None:
    """The cached pass lowers to Mosaic (tpu) / Triton (cuda) custom calls, for a prefill (T = S) and a decode
    step (T = 1 over 300 slots), bf16, 8 query heads over 2 kv heads."""
    spec = jax.ShapeDtypeStruct
    b, h, k, d, dt = 2, 8, 2, 128, jnp.bfloat16
    starts = (spec((b,), jnp.int32), spec((b,), jnp.int32))
    for queries, slots in ((100, 100), (1, 300)):
        q, kv = spec((b, queries, h, d), dt), spec((b, slots, k, d), dt)
        assert _lower(platform, pallas_attention.cached_attention, q, kv, kv, *starts).count(marker) >= 1

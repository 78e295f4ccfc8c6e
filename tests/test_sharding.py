"""Mesh sharding on the 8 fake CPU devices (tests/conftest.py): sharded forward == unsharded, golden partition
specs, context-parallel attention, mesh-spec errors.

Tolerance: fp32 throughout; sharded vs unsharded max abs error <= 2e-5 of the output's max abs value (sharding
only reorders sums: all-reduces of partial matmuls, the context-parallel softmax over reordered keys).

Golden snapshots (tests/golden/sharding_{nano,super}.json) pin the partition spec of every parameter on the
preset's reference mesh (configs/mesh/<preset>.json). After a deliberate change of the rules, regenerate with
    COSMOS_JAX_REGEN_GOLDEN=1 pytest tests/test_sharding.py -k golden
and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cosmos_jax.config import load_preset
from cosmos_jax.modeling.context_parallel import context_parallel_generator_attention, query_chunked_generator_attention
from cosmos_jax.modeling.inputs import GeneratorInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence
from cosmos_jax.sharding import (
    ActivationSharding,
    MeshSpecError,
    abstract_mesh,
    load_mesh_preset,
    make_mesh,
    param_logical_axes,
    param_shardings,
    replicated_fraction,
    shard_batch,
    spec_for,
    specs_snapshot,
)
from pallas_kernels import reference
from pallas_kernels.xla import blocked as blocked_xla

REL_TOL = 2e-5
GOLDEN = Path(__file__).parent / "golden"
RULES = load_mesh_preset("tiny").rules


def _tiny_inputs(cfg, batch_und_lens=(7, 5), latent=(4, 4, 4), sound_len=4, action_len=4):
    """Two rows (different prompt lengths, one clean first frame in row 0); Lg = 16 + 4 + 4 = 24 tokens."""
    rng = np.random.default_rng(0)
    layouts = [
        layout_sequence(cfg, n, latent, fps=24.0, clean_vision_frames=[0] if b == 0 else [],
                        sound_len=sound_len, action_len=action_len, clean_action_rows=[1])
        for b, n in enumerate(batch_und_lens)
    ]
    ids = [rng.integers(0, cfg.vocab_size, size=n) for n in batch_und_lens]
    text = batch_text(ids, layouts)
    batch = len(layouts)
    gen = GeneratorInputs(
        position_ids=batch_generator_positions(layouts),
        vision=rng.standard_normal((batch, cfg.latent_channel, *latent)).astype(np.float32),
        vision_noisy=np.stack([lay.vision_noisy for lay in layouts]),
        vision_t=np.array([973.0, 500.0], np.float32),
        sound=rng.standard_normal((batch, cfg.sound_dim, sound_len)).astype(np.float32),
        sound_noisy=np.ones((batch, sound_len), bool),
        sound_t=np.array([973.0, 500.0], np.float32),
        action=rng.standard_normal((batch, action_len, cfg.action_dim)).astype(np.float32),
        action_noisy=np.stack([lay.action_noisy for lay in layouts]),
        action_t=np.array([973.0, 500.0], np.float32),
        action_domain=np.array([2, 5], np.int32),
    )
    return text, gen


@pytest.fixture(scope="module")
def tiny():
    cfg = load_preset("tiny")
    model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla")
    params = jax.jit(model.init)(jax.random.key(3))
    text, gen = _tiny_inputs(cfg)
    want = jax.jit(model.__call__)(params, jax.tree.map(jnp.asarray, text), jax.tree.map(jnp.asarray, gen))
    return cfg, params, text, gen, want


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("mesh_spec", ["fsdp=8", "fsdp=4,tensor=2", "fsdp=2,context=4", "data=2,context=2,tensor=2",
                                       "context=8"])
def test_sharded_forward_equals_unsharded(tiny, mesh_spec):
    cfg, params, text, gen, want = tiny
    mesh = make_mesh(mesh_spec)
    model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="xla", sharding=ActivationSharding(mesh, RULES))
    shardings = param_shardings(params, mesh, RULES)
    sharded = jax.device_put(params, shardings)
    out = jax.jit(model.__call__)(sharded, shard_batch(text, mesh, RULES), shard_batch(gen, mesh, RULES))
    for name in ("vision", "sound", "action"):
        err = _rel_err(getattr(out, name), getattr(want, name))
        assert err <= REL_TOL, f"{mesh_spec} {name}: relative max error {err:.3g}"
    assert float(np.abs(np.asarray(out.vision)).max()) > 0.1


def test_context_parallel_cached_generate_equals_joint_forward(tiny):
    cfg, params, text, gen, want = tiny
    mesh = make_mesh("context=4,tensor=2")
    sharding = ActivationSharding(mesh, RULES, query_chunk=4)  # 24 tokens / 4 shards = 6 per shard, chunks of 3
    model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="blocked", sharding=sharding)
    sharded = jax.device_put(params, param_shardings(params, mesh, RULES))
    cache, _ = jax.jit(model.encode_reasoner)(sharded, shard_batch(text, mesh, RULES))
    out = jax.jit(model.denoise_step)(sharded, cache, shard_batch(gen, mesh, RULES))
    assert _rel_err(out.vision, want.vision) <= REL_TOL
    assert _rel_err(out.action, want.action) <= REL_TOL


@pytest.mark.parametrize("impl", [reference.generator_attention_reference, blocked_xla.generator_attention])
@pytest.mark.parametrize("mesh_spec", ["context=8", "context=2,tensor=4", "data=2,context=4"])
def test_context_parallel_attention_equals_unsharded(impl, mesh_spec):
    rng = np.random.default_rng(1)
    batch, lu, lg, heads, kv_heads, dim = 2, 9, 64, 8, 4, 16
    q = rng.standard_normal((batch, lg, heads, dim)).astype(np.float32)
    k_und, v_und = (rng.standard_normal((batch, lu, kv_heads, dim)).astype(np.float32) for _ in range(2))
    k_gen, v_gen = (rng.standard_normal((batch, lg, kv_heads, dim)).astype(np.float32) for _ in range(2))
    und_len, gen_len = np.array([9, 4], np.int32), np.array([lg, lg], np.int32)
    want = reference.generator_attention_reference(q, k_und, v_und, k_gen, v_gen, und_len, gen_len)
    mesh = make_mesh(mesh_spec)
    attend = jax.jit(context_parallel_generator_attention(impl, ActivationSharding(mesh, RULES)))
    got = attend(q, k_und, v_und, k_gen, v_gen, und_len, gen_len)
    assert _rel_err(got, want) <= REL_TOL
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_context_parallel_falls_back_when_length_does_not_divide():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 10, 2, 8)).astype(np.float32)
    k_und, v_und, k_gen, v_gen = (rng.standard_normal((1, n, 2, 8)).astype(np.float32) for n in (3, 3, 10, 10))
    lens = (np.array([3], np.int32), np.array([10], np.int32))
    want = reference.generator_attention_reference(q, k_und, v_und, k_gen, v_gen, *lens)
    attend = context_parallel_generator_attention(reference.generator_attention_reference,
                                                  ActivationSharding(make_mesh("context=8"), RULES))
    assert _rel_err(attend(q, k_und, v_und, k_gen, v_gen, *lens), want) <= REL_TOL


def test_query_chunked_attention_value_and_gradient_equal_unchunked():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 24, 4, 8)).astype(np.float32)
    k_und, v_und, k_gen, v_gen = (rng.standard_normal((2, n, 2, 8)).astype(np.float32) for n in (5, 5, 24, 24))
    lens = (np.array([5, 2], np.int32), np.array([24, 24], np.int32))
    plain = reference.generator_attention_reference
    chunked = query_chunked_generator_attention(plain, 10)  # 10 -> chunks of 8 (largest divisor of 24 <= 10)

    def loss(fn, q, k_gen):
        return jnp.sum(jnp.sin(fn(q, k_und, v_und, k_gen, v_gen, *lens)))

    args = (q, k_und, v_und, k_gen, v_gen, *lens)
    assert _rel_err(chunked(*args), plain(*args)) <= REL_TOL
    got = jax.jit(jax.grad(lambda a, b: loss(chunked, a, b), argnums=(0, 1)))(q, k_gen)
    want = jax.grad(lambda a, b: loss(plain, a, b), argnums=(0, 1))(q, k_gen)
    for g, w in zip(got, want):
        assert _rel_err(g, w) <= REL_TOL
    with pytest.raises(ValueError, match="positive int"):
        query_chunked_generator_attention(plain, 0)


def test_params_are_sharded_as_the_rules_say(tiny):
    _, params, _, _, _ = tiny
    mesh = make_mesh("fsdp=4,tensor=2")
    shardings = param_shardings(params, mesh, RULES)
    layers = shardings["generator"]["layers"]
    assert layers["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert layers["o_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert layers["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert shardings["reasoner"]["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    assert layers["q_norm"]["scale"].spec == P()
    placed = jax.device_put(params["generator"]["layers"]["q_proj"]["kernel"], layers["q_proj"]["kernel"])
    assert placed.addressable_shards[0].data.shape == (2, 64 // 4, 128 // 2)


def test_spec_for_drops_axes_that_do_not_divide_or_repeat():
    mesh = abstract_mesh("data=2,fsdp=4,tensor=8")
    assert spec_for((8, 64), ("batch", "embed"), RULES, mesh) == P(("data", "fsdp"))
    assert spec_for((2, 64), ("batch", "embed"), RULES, mesh) == P("data", "fsdp")
    assert spec_for((4, 12), ("embed", "mlp"), RULES, mesh) == P("fsdp")
    assert spec_for((16, 16), ("mlp", "q_heads"), RULES, mesh) == P("tensor")
    with pytest.raises(ValueError, match="rank 3"):
        spec_for((1, 2, 3), ("batch",), RULES, mesh)
    with pytest.raises(ValueError, match=r"no sharding rule for logical axes \['embedd'\]"):
        spec_for((4, 4), ("batch", "embedd"), RULES, mesh)


def test_every_parameter_of_every_preset_has_logical_axes():
    for preset in ("tiny", "edge", "nano", "super"):
        params = Cosmos3Transformer(load_preset(preset)).abstract_params()
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            names = param_logical_axes([p.key for p in path], leaf.ndim)
            assert len(names) == leaf.ndim
    with pytest.raises(ValueError, match="generator/mystery/kernel"):
        param_logical_axes(("generator", "mystery", "kernel"), 2)


@pytest.mark.parametrize("preset", ["nano", "super"])
def test_golden_sharding_snapshot(preset):
    mesh_preset = load_mesh_preset(preset)
    mesh = abstract_mesh(mesh_preset.mesh)
    params = Cosmos3Transformer(load_preset(preset)).abstract_params()
    got = {"mesh": mesh_preset.mesh, "specs": specs_snapshot(params, mesh, mesh_preset.rules)}
    path = GOLDEN / f"sharding_{preset}.json"
    if os.environ.get("COSMOS_JAX_REGEN_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got["mesh"] == want["mesh"]
    changed = sorted(k for k in set(got["specs"]) | set(want["specs"]) if got["specs"].get(k) != want["specs"].get(k))
    assert not changed, f"partition specs changed for {changed}; regenerate deliberately (see module docstring)"


def test_replicated_share_is_small_for_the_big_presets():
    for preset, bound in (("nano", 0.001), ("super", 0.001)):
        mesh_preset = load_mesh_preset(preset)
        params = Cosmos3Transformer(load_preset(preset)).abstract_params()
        share = replicated_fraction(params, abstract_mesh(mesh_preset.mesh), mesh_preset.rules)
        assert 0 < share < bound, f"{preset}: {share:.2%} of parameter bytes replicated"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fsdp=4,tensor", "not of the form axis=size"),
        ("fsdp=4,model=2", "unknown axis 'model'"),
        ("fsdp=four", "positive integer"),
        ("fsdp=0,tensor=8", "positive integer"),
        ("fsdp=2,fsdp=4", "given twice"),
        ("", "a mesh spec is a string"),
        ("fsdp=4,tensor=4", "needs 16 devices but 8 are available"),
    ],
)
def test_make_mesh_errors(spec, message):
    with pytest.raises(MeshSpecError, match=message):
        make_mesh(spec)


def test_make_mesh_shape_and_axis_order():
    mesh = make_mesh("tensor=2,fsdp=4")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    assert mesh.devices.shape == (1, 4, 1, 2)


def test_one_row_and_one_rules_table_place_a_weight():
    """The walk-through of docs/checkpoints.md: the row gives key, layout and logical axes; the preset's rules the
    spec. Every logical name of the key table has a rule in every mesh preset."""
    from cosmos_jax.convert.keymap_transformer import LINEAR, ROWS, entry_for_path
    from cosmos_jax.convert.safetensors_io import Transpose

    row = entry_for_path(("generator", "layers", "q_proj", "kernel"))
    assert row.torch_keys(2) == ["layers.0.self_attn.add_q_proj.weight", "layers.1.self_attn.add_q_proj.weight"]
    assert row.transform == LINEAR and row.layout((64, 128)) == Transpose((1, 0))
    assert row.logical_axes() == ("layers", "embed", "q_heads")
    super_preset = load_mesh_preset("super")
    assert spec_for((64, 8192, 8192), row.logical_axes(), super_preset.rules,
                    abstract_mesh(super_preset.mesh)) == P(None, "fsdp", "tensor")
    names = {n for entry in ROWS for n in entry.logical_axes()}
    assert {"layers", "embed", "q_heads", "kv_heads", "mlp", "vocab", "domain"} <= names
    for preset in ("tiny", "edge", "nano", "super"):
        assert names <= {logical for logical, _ in load_mesh_preset(preset).rules}, preset

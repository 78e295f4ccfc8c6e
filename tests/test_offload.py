"""Host offload of the towers (cosmos_jax/sampling/offload.py, `generate --offload-reasoner`): the same outputs,
the weights resting in host memory between calls, on one device or on a mesh (the 8 fake CPU devices of
tests/conftest.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cosmos_jax.demo import build_demo_checkpoint, demo_image
from cosmos_jax.sampling import offload
from cosmos_jax.sampling.batch import Sample
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.sharding import load_mesh_preset, make_mesh


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")


def test_offloaded_policy_equals_resident(demo):
    request = GenerationRequest("Pick up the dark block.", image=demo_image(), action_mode="policy",
                                domain="bridge_orig_lerobot", chunk=8, resolution_tier=256, steps=2, guidance=1.0,
                                seed=0, output_type="latent")
    resident = Cosmos3Pipeline.from_pretrained(demo, dtype=jnp.float32, attention="xla")
    offloaded = Cosmos3Pipeline.from_pretrained(demo, dtype=jnp.float32, attention="xla", offload_reasoner=True)
    want = resident(request, progress=False)
    got = offloaded(request, progress=False)
    for a, b in ((got.latents, want.latents), (got.actions, want.actions)):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    assert offload.device_bytes(offloaded.params) == 0  # everything rests in host memory between calls
    assert offload.device_bytes(resident.params) > 0
    assert {x.sharding.memory_kind for x in jax.tree.leaves(offloaded.params)} == {offload.HOST}


def test_offload_needs_the_cache(demo):
    pipeline = Cosmos3Pipeline.from_pretrained(demo, dtype=jnp.float32, attention="xla")
    with pytest.raises(ValueError, match="offload_reasoner needs cache_reasoner"):
        Cosmos3Pipeline(pipeline.model, pipeline.params, pipeline.tokenizer, pipeline.scheduler_config,
                        cache_reasoner=False, offload_reasoner=True)


def test_offloaded_batch_of_distinct_prompts_equals_resident(demo):
    """Two prompts in one batch (the reasoner pass encodes both, the loop gathers each row's K/V): the same
    samples as with both towers resident, fp32, within 1e-6 of the output scale."""
    common = dict(image=demo_image(), action_mode="policy", domain="bridge_orig_lerobot", chunk=8,
                  resolution_tier=256, steps=2, guidance=2.0, output_type="latent")
    first = GenerationRequest("Pick up the dark block.", seed=0, **common)
    second = GenerationRequest("Push the block to the left edge of the table.", seed=1, **common)
    samples = [Sample(first, 0), Sample(second, 0), Sample(second, 1)]
    resident = Cosmos3Pipeline.from_pretrained(demo, dtype=jnp.float32, attention="xla")
    offloaded = Cosmos3Pipeline.from_pretrained(demo, dtype=jnp.float32, attention="xla", offload_reasoner=True)
    want = resident.run_batch(samples, progress=False)
    got = offloaded.run_batch(samples, progress=False)
    assert [(r.seed, r.sample_index) for r in got] == [(0, 0), (1, 0), (1, 1)]
    for g, w in zip(got, want):
        for a, b in ((g.latents, w.latents), (g.actions, w.actions)):
            assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    assert np.abs(got[1].actions - got[2].actions).max() > 1e-3  # two samples of one prompt differ
    assert offload.device_bytes(offloaded.params) == 0


@pytest.mark.slow
def test_offloaded_on_a_mesh_equals_resident_on_one_device(demo):
    """data=2,tensor=2 with the towers offloaded: every shard rests in its device's host memory, keeps its sharding,
    and the samples are the one-device resident ones (fp32, within 1e-5 of the output scale; measured 2e-7)."""
    request = GenerationRequest("Pick up the dark block.", image=demo_image(), action_mode="policy",
                                domain="bridge_orig_lerobot", chunk=8, resolution_tier=256, steps=2, guidance=2.0,
                                seed=0, output_type="latent")
    want = Cosmos3Pipeline.from_pretrained(demo, dtype=jnp.float32, attention="xla")(request, progress=False)
    mesh, rules = make_mesh("data=2,tensor=2", jax.devices()[:4]), load_mesh_preset("tiny").rules
    offloaded = Cosmos3Pipeline.from_pretrained(demo, dtype=jnp.float32, attention="xla", mesh=mesh, rules=rules,
                                                offload_reasoner=True)
    kernel = offloaded.params["generator"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.memory_kind == offload.HOST and kernel.sharding.spec == P(None, None, "tensor")
    assert offload.device_bytes(offloaded.params) == 0
    got = offloaded(request, progress=False)
    for a, b in ((got.latents, want.latents), (got.actions, want.actions)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert offload.device_bytes(offloaded.params) == 0  # back in host memory after the call

"""Host offload of the towers (cosmos_jax/sampling/offload.py, `generate --offload-reasoner`): the same outputs,
the weights resting in host memory between calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.demo import build_demo_checkpoint, demo_image
from cosmos_jax.sampling import offload
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest


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

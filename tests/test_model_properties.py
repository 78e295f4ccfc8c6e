"""Structural properties of the MoT model, on a random tiny config in fp32 with the XLA attention oracle."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosmos_jax.config import load_preset
from cosmos_jax.modeling.inputs import GeneratorInputs, TextInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence

LATENT = (2, 4, 4)
SOUND, ACTION = 3, 4


@pytest.fixture(scope="module")
def model_and_params():
    model = Cosmos3Transformer(load_preset("tiny"), dtype=jnp.float32, attention="xla")
    params = model.init(jax.random.key(0))
    # Perturb every norm scale away from 1 so the properties are not trivially met.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * (1 + 0.3 * jax.random.normal(jax.random.key(len(path)), x.shape))
        if "scale" in jax.tree_util.keystr(path) else x,
        params,
    )
    return model, params


def _inputs(cfg, prompts, seed=0, clean=(0,)):
    layouts = [layout_sequence(cfg, len(p), LATENT, fps=24.0, clean_vision_frames=clean, sound_len=SOUND,
                               action_len=ACTION) for p in prompts]
    text = jax.tree.map(jnp.asarray, batch_text(prompts, layouts))
    rng = np.random.default_rng(seed)
    b = len(prompts)
    gen = GeneratorInputs(
        position_ids=jnp.asarray(batch_generator_positions(layouts)),
        vision=jnp.asarray(rng.standard_normal((b, cfg.latent_channel, *LATENT)), jnp.float32),
        vision_noisy=jnp.asarray(np.stack([lay.vision_noisy for lay in layouts])),
        vision_t=jnp.full((b,), 800.0),
        sound=jnp.asarray(rng.standard_normal((b, cfg.sound_dim, SOUND)), jnp.float32),
        sound_noisy=jnp.ones((b, SOUND), bool), sound_t=jnp.full((b,), 800.0),
        action=jnp.asarray(rng.standard_normal((b, ACTION, cfg.action_dim)), jnp.float32),
        action_noisy=jnp.ones((b, ACTION), bool), action_t=jnp.full((b,), 800.0),
        action_domain=jnp.arange(b, dtype=jnp.int32) % cfg.num_embodiment_domains,
    )
    return text, gen


@functools.lru_cache(maxsize=None)
def _jitted(model, name):
    return jax.jit(getattr(model, name))


prompt_st = st.lists(st.integers(1, 599), min_size=1, max_size=12)


@settings(max_examples=4)
@given(prompt=prompt_st, seed=st.integers(0, 2**16))
def test_reasoner_ignores_generator_tokens_and_cache_equals_joint(model_and_params, prompt, seed):
    model, params = model_and_params
    text, gen = _inputs(model.config, [prompt], seed)
    _, other = _inputs(model.config, [prompt], seed + 1)
    out_a, und_a = _jitted(model, "joint")(params, text, gen)
    out_b, und_b = _jitted(model, "joint")(params, text, other)
    np.testing.assert_array_equal(np.asarray(und_a), np.asarray(und_b))
    assert float(jnp.abs(out_a.vision - out_b.vision).max()) > 1e-3  # the generator did see the change
    cache, und_c = _jitted(model, "encode_reasoner")(params, text)
    chex.assert_trees_all_close(und_c, und_a, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(_jitted(model, "denoise_step")(params, cache, gen), out_a, atol=1e-6, rtol=1e-6)


@settings(max_examples=4)
@given(prompt=st.lists(st.integers(1, 599), min_size=2, max_size=12), data=st.data())
def test_reasoner_is_causal(model_and_params, prompt, data):
    model, params = model_and_params
    j = data.draw(st.integers(0, len(prompt) - 1))
    changed = list(prompt)
    changed[j] = 1 + (prompt[j] % 599)
    _, h_a = _jitted(model, "encode_reasoner")(params, _inputs(model.config, [prompt])[0])
    _, h_b = _jitted(model, "encode_reasoner")(params, _inputs(model.config, [changed])[0])
    np.testing.assert_array_equal(np.asarray(h_a[:, :j]), np.asarray(h_b[:, :j]))
    assert float(jnp.abs(h_a[:, j] - h_b[:, j]).max()) > 1e-4


def test_jit_equals_eager(model_and_params):
    model, params = model_and_params
    text, gen = _inputs(model.config, [[5, 6, 7, 8, 9]])
    chex.assert_trees_all_close(jax.jit(model.__call__)(params, text, gen), model(params, text, gen),
                                atol=1e-5, rtol=1e-5)


def test_results_do_not_depend_on_batch_padding(model_and_params):
    model, params = model_and_params
    short, long = [11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28]
    alone_text, alone_gen = _inputs(model.config, [short], seed=3)
    alone = model(params, alone_text, alone_gen)
    # The same row batched beside a longer prompt: its text is right-padded with 5 pad tokens.
    both_text, both_gen = _inputs(model.config, [long, short], seed=3)
    both_gen = jax.tree.map(lambda x: x, both_gen).replace(
        vision=both_gen.vision.at[1].set(alone_gen.vision[0]),
        sound=both_gen.sound.at[1].set(alone_gen.sound[0]),
        action=both_gen.action.at[1].set(alone_gen.action[0]),
        action_domain=both_gen.action_domain.at[1].set(alone_gen.action_domain[0]),
    )
    batched = model(params, both_text, both_gen)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1:], batched), alone, atol=2e-5, rtol=2e-5)
    assert not np.allclose(np.asarray(batched.vision[0]), np.asarray(batched.vision[1]), atol=1e-3)

"""The host-side layout equals the pipeline's own `_prepare_*_segment` helpers, bit for bit, on random shapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence, vae_position_ids
from torch_reference import NANO_STYLE, build_torch_transformer, jax_config, reference_segments


@pytest.fixture(scope="module")
def model():
    return build_torch_transformer(dict(NANO_STYLE, num_hidden_layers=1), seed=0)


@given(
    und_len=st.integers(1, 40),
    t=st.integers(1, 6),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    fps=st.sampled_from([10.0, 16.0, 24.0, 30.0, 12.5]),
    clean=st.lists(st.integers(0, 7), max_size=3),
    sound_len=st.sampled_from([0, 1, 7]),
    action_len=st.sampled_from([0, 1, 5]),
    action_clean=st.lists(st.integers(0, 5), max_size=5),
)
def test_layout_equals_the_pipeline(model, und_len, t, h, w, fps, clean, sound_len, action_len, action_clean):
    cfg = jax_config(model)
    want = reference_segments(model, und_len, (t, h, w), fps, clean, sound_len, action_len, action_clean)
    got = layout_sequence(cfg, und_len, (t, h, w), fps=fps, clean_vision_frames=clean, sound_len=sound_len,
                          action_len=action_len, clean_action_rows=action_clean)
    np.testing.assert_array_equal(got.position_ids, want["position_ids"].float().numpy())
    assert got.position_ids.dtype == np.float32
    assert list(got.vision_grid) == list(want["vision_token_shapes"][0])
    np.testing.assert_array_equal(got.vision_sequence_indexes(), want["vision_sequence_indexes"].numpy())
    np.testing.assert_array_equal(got.vision_mse_loss_indexes(), want["vision_mse_loss_indexes"].numpy())
    np.testing.assert_array_equal(np.flatnonzero(got.vision_noisy), want["vision_noisy_frame_indexes"][0].numpy())
    if sound_len:
        np.testing.assert_array_equal(got.sound_sequence_indexes(), want["sound_sequence_indexes"].numpy())
    if action_len:
        np.testing.assert_array_equal(got.action_sequence_indexes(), want["action_sequence_indexes"].numpy())
        np.testing.assert_array_equal(got.action_mse_loss_indexes(), want["action_mse_loss_indexes"].numpy())
    assert got.und_len + got.num_gen == want["sequence_length"]


def test_fps_modulated_positions_have_the_published_values():
    # 24 fps video: latent frame f at f + offset; sound at 0.96 k + offset; actions at (k+1) * 6 / fps + offset.
    np.testing.assert_array_equal(vae_position_ids(3, 1, 1, 15007, fps=24.0)[0], [15007, 15008, 15009])
    np.testing.assert_allclose(vae_position_ids(3, 1, 1, 15007, fps=25.0, temporal_compression=1)[0],
                               [15007, 15007.96, 15008.92], rtol=0, atol=1e-3)
    np.testing.assert_array_equal(
        vae_position_ids(2, 1, 1, 15007, fps=24.0, temporal_compression=1, base_temporal_compression=4,
                         start_frame_offset=1)[0], [15007.25, 15007.5])


def test_batching_pads_text_and_shares_the_generator_layout(model):
    cfg = jax_config(model)
    long = layout_sequence(cfg, 9, (2, 4, 4), fps=24.0)
    short = layout_sequence(cfg, 4, (2, 4, 4), fps=24.0)
    text = batch_text([list(range(1, 10)), [5, 6, 7, 8]], [long, short])
    assert text.input_ids.tolist()[1] == [5, 6, 7, 8, 0, 0, 0, 0, 0]
    assert text.und_len.tolist() == [9, 4]
    gen_pos = batch_generator_positions([long, short])
    assert gen_pos.shape == (2, 3, 8)
    assert gen_pos[0, 0, 0] == 9 + 15000 and gen_pos[1, 0, 0] == 4 + 15000
    with pytest.raises(ValueError, match="share one generator layout"):
        batch_generator_positions([long, layout_sequence(cfg, 4, (3, 4, 4), fps=24.0)])
    with pytest.raises(ValueError, match="laid out as und_len=9"):
        batch_text([[1, 2]], [long])
    with pytest.raises(ValueError, match="at least one token"):
        layout_sequence(cfg, 0, (2, 4, 4), fps=24.0)

"""UniPC flow scheduler: parity with diffusers' UniPCMultistepScheduler (fp32, CPU).

Schedules (sigmas, timesteps) are compared for exact equality for 1..50 steps. Sampling loops feed the same
random velocities to both and compare samples with atol 1e-5 (measured max ≈ 3e-6 over 50 steps on unit-normal
data): XLA contracts `a·x − b·y` into FMAs and turns division by a scalar into a reciprocal multiply, and torch's
CPU `log` is SLEEF's (≤1 ulp from the correctly rounded log used here), so bit equality is not expected.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from cosmos_jax.sampling.scheduler import (
    SchedulerState,
    _solve_2x2_f32,
    conditioning_timestep,
    init_state,
    make_schedule,
    step,
)
from cosmos_jax.scheduler_config import SchedulerConfig, SchedulerConfigError

CONVERTER = dict(
    use_karras_sigmas=True, use_flow_sigmas=True, prediction_type="flow_prediction", sigma_max=200.0, sigma_min=0.147
)
SHIFT10 = dict(use_karras_sigmas=False, flow_shift=10.0)
# name -> (diffusers overrides on the converter config, native flow schedule)
SETUPS = {
    "karras": ({}, False),
    "shift10": (SHIFT10, False),
    "native_shift10": (SHIFT10, True),
    "native_karras": ({}, True),
}
SAMPLE_SHAPE = (1, 1, 4, 3, 5, 6)  # the pipeline's 6-D vision sample [1, 1, C, T, H, W]
ATOL = 1e-5


def _reference(setup: str, num_steps: int) -> UniPCMultistepScheduler:
    overrides, native = SETUPS[setup]
    ref = UniPCMultistepScheduler(**{**CONVERTER, **overrides})
    if native:  # Cosmos3OmniPipeline(use_native_flow_schedule=True)
        ref.set_timesteps(num_steps, sigmas=np.linspace(1.0 - 1.0 / 1000, 0.0, num_steps + 1)[:-1])
    else:
        ref.set_timesteps(num_steps)
    return ref


def _ours(setup: str, num_steps: int):
    overrides, native = SETUPS[setup]
    return make_schedule(SchedulerConfig.cosmos3(**overrides), num_steps, native_flow=native)


def _inputs(num_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Initial sample and per-step velocities; channel 0 has zero velocity (a conditioned, clean region)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
    velocities = rng.standard_normal((num_steps, *SAMPLE_SHAPE)).astype(np.float32)
    velocities[:, :, :, 0] = 0.0
    return x, velocities


def _reference_loop(ref: UniPCMultistepScheduler, x: np.ndarray, velocities: np.ndarray) -> np.ndarray:
    sample = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        sample = ref.step(torch.from_numpy(velocities[i]), t, sample).prev_sample
    return sample.numpy()


@jax.jit
def _scan_loop(coefficients, x: jax.Array, velocities: jax.Array) -> jax.Array:
    def body(carry: tuple[jax.Array, SchedulerState], velocity: jax.Array):
        sample, state = carry
        sample, state = step(coefficients, state, velocity, sample)
        return (sample, state), None

    (sample, _), _ = jax.lax.scan(body, (x, init_state(x.shape)), velocities)
    return sample


@pytest.mark.parametrize("setup", list(SETUPS))
def test_schedule_identical_to_diffusers_1_to_50_steps(setup: str) -> None:
    for num_steps in range(1, 51):
        ref = _reference(setup, num_steps)
        ours = _ours(setup, num_steps)
        assert ours.sigmas.dtype == np.float32 and ours.timesteps.dtype == np.int64
        np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy(), err_msg=f"{setup} N={num_steps}")
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy(), err_msg=f"{setup} N={num_steps}")
        assert ours.num_steps == num_steps and ours.sigmas[-1] == 0.0


def test_spec_quoted_schedules() -> None:
    np.testing.assert_array_equal(_ours("karras", 4).timesteps, [995, 973, 798, 128])
    karras35 = _ours("karras", 35)
    np.testing.assert_array_equal(karras35.timesteps[:3], [995, 994, 993])
    np.testing.assert_array_equal(karras35.timesteps[-3:], [229, 174, 128])
    np.testing.assert_allclose(
        karras35.sigmas[[0, 1, 2, -4, -3, -2]], [0.99502, 0.99432, 0.99349, 0.22942, 0.17428, 0.12816], atol=5e-6
    )
    shift35 = _ours("shift10", 35)
    np.testing.assert_array_equal(shift35.timesteps[:3], [999, 997, 993])
    np.testing.assert_array_equal(shift35.timesteps[-2:], [381, 233])
    np.testing.assert_allclose(shift35.sigmas[:3], [0.999999, 0.99707, 0.99398], atol=5e-6)
    # 50 Karras steps repeat two integer timesteps; the sigmas stay distinct.
    karras50 = _ours("karras", 50)
    assert len(set(karras50.timesteps.tolist())) == 48 and len(set(karras50.sigmas.tolist())) == 51
    # With Karras on, the native flow schedule changes nothing (gotcha 2).
    np.testing.assert_array_equal(_ours("native_karras", 35).sigmas, karras35.sigmas)


STEP_COUNTS = (1, 2, 3, 4, 5, 8, 17, 35, 50)


@pytest.mark.parametrize("setup", ["karras", "shift10", "native_shift10"])
def test_scan_sampling_loop_matches_diffusers(setup: str) -> None:
    for num_steps in STEP_COUNTS:
        x, velocities = _inputs(num_steps, seed=num_steps)
        expected = _reference_loop(_reference(setup, num_steps), x, velocities)
        got = np.asarray(_scan_loop(_ours(setup, num_steps).coefficients, jnp.asarray(x), jnp.asarray(velocities)))
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL, err_msg=f"{setup} N={num_steps}")
        # Zero-velocity (clean) channel: x0 = x, so it stays where it started up to fp32 drift, in both.
        np.testing.assert_allclose(got[:, :, 0], x[:, :, 0], rtol=0, atol=1e-5)


def test_jitted_step_in_python_loop_compiles_once_and_matches() -> None:
    num_steps = 12
    ref = _reference("shift10", num_steps)
    x, velocities = _inputs(num_steps, seed=7)
    expected = _reference_loop(ref, x, velocities)
    jitted = jax.jit(step)
    coefficients = jax.tree_util.tree_map(jnp.asarray, _ours("shift10", num_steps).coefficients)
    sample, state = jnp.asarray(x), init_state(SAMPLE_SHAPE)
    for i in range(num_steps):
        sample, state = jitted(coefficients, state, jnp.asarray(velocities[i]), sample)
    assert jitted._cache_size() == 1
    assert int(state.step_index) == num_steps
    np.testing.assert_allclose(np.asarray(sample), expected, rtol=0, atol=ATOL)


def test_single_step_lands_on_x0() -> None:
    """σ_next = 0 ⇒ λ = +∞, expm1(−∞) = −1: the (first-order) last step returns x0 = x − σ·v."""
    x, velocities = _inputs(1, seed=3)
    schedule = _ours("karras", 1)
    state = init_state(SAMPLE_SHAPE)
    got, state = jax.jit(step)(schedule.coefficients, state, jnp.asarray(velocities[0]), jnp.asarray(x))
    x0 = x - schedule.sigmas[0] * velocities[0]
    np.testing.assert_allclose(np.asarray(got), x0, rtol=0, atol=1e-6)
    expected = _reference_loop(_reference("karras", 1), x, velocities)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)
    assert np.isfinite(np.asarray(got)).all() and int(state.step_index) == 1


def test_conditioning_timestep_is_truncated_integer_times_scale() -> None:
    schedule = _ours("karras", 35)
    for i, t in enumerate(schedule.timesteps):
        expected = (torch.full((2,), int(t)) * 0.001).numpy()[0]  # what the transformer computes
        got = conditioning_timestep(schedule, i)
        assert got.dtype == jnp.float32 and np.float32(got) == expected
    assert np.float32(conditioning_timestep(schedule, 0)) == np.float32(0.995000064)
    # σ itself is not what the model sees
    assert float(schedule.sigmas[0]) != float(conditioning_timestep(schedule, 0))
    traced = jax.jit(lambda i: conditioning_timestep(schedule, i))(jnp.int32(34))
    assert np.float32(traced) == np.float32(128) * np.float32(0.001)


def test_corrector_solve_matches_torch_linalg_solve() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        rk = np.float32(-rng.uniform(0.2, 3.0))
        b1, b2 = np.float32(rng.uniform(0.3, 0.9)), np.float32(rng.uniform(0.2, 0.8))
        matrix = torch.tensor([[1.0, 1.0], [float(rk), 1.0]])
        expected = torch.linalg.solve(matrix, torch.tensor([float(b1), float(b2)]))
        np.testing.assert_allclose(_solve_2x2_f32(rk, b1, b2), expected.numpy(), rtol=2e-7, atol=0)


def test_config_round_trips_with_diffusers(tmp_path) -> None:
    ref = UniPCMultistepScheduler(**CONVERTER)
    ref.save_config(tmp_path / "from_diffusers")
    ours = SchedulerConfig.from_json_file(tmp_path / "from_diffusers")
    assert ours == SchedulerConfig.cosmos3()
    (tmp_path / "from_ours").mkdir()
    ours.to_json_file(tmp_path / "from_ours")
    reloaded = UniPCMultistepScheduler.from_pretrained(tmp_path / "from_ours")
    theirs = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: v for k, v in reloaded.config.items() if not k.startswith("_")} == theirs
    written = json.loads((tmp_path / "from_ours" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "UniPCMultistepScheduler" and written["sigma_max"] == 200.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"solver_order": 3}, "solver_order"),
        ({"prediction_type": "epsilon"}, "prediction_type"),
        ({"solver_type": "bh1"}, "solver_type"),
        ({"lower_order_final": False}, "lower_order_final"),
        ({"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({"disable_corrector": [3]}, "disable_corrector"),
        ({"sigma_min": None}, "sigma_min"),
        ({"flow_shift": 0.0}, "flow_shift"),
        ({"not_a_key": 1}, "not_a_key"),
    ],
)
def test_unsupported_config_names_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(SchedulerConfigError, match=key):
        SchedulerConfig.cosmos3(**overrides)


def test_bad_inputs_raise() -> None:
    with pytest.raises(SchedulerConfigError, match="prediction_type"):
        SchedulerConfig()  # diffusers' bare defaults are an epsilon scheduler
    with pytest.raises(ValueError, match="num_steps"):
        make_schedule(SchedulerConfig.cosmos3(), 0)
    with pytest.raises(ValueError, match="shape mismatch"):
        step(_ours("karras", 2).coefficients, init_state((2, 3)), jnp.zeros((2, 4)), jnp.zeros((2, 4)))

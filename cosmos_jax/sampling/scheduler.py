"""UniPC multistep (bh2, order 2) for flow prediction, as pure jittable functions.

Matches diffusers' `UniPCMultistepScheduler` in the configuration Cosmos 3 uses (`use_flow_sigmas=True`,
`prediction_type="flow_prediction"`, `predict_x0=True`, `solver_type="bh2"`, `solver_order=2`,
`lower_order_final=True`, final sigma 0), bit for bit in fp32.

Split of work:
- host (numpy, once per schedule): sigmas and integer timesteps exactly as `set_timesteps` builds them, and every
  per-step scalar of the predictor/corrector (log-SNR steps, `expm1`, the 2x2 corrector solve) in float32 with the
  reference's operation order. The σ=0 last step gives λ=+∞ and `expm1(-∞) = -1`, so it reduces to `x_next = x0`.
- device (`step`): only elementwise tensor arithmetic with those scalars, gathered by a traced step index, so the
  whole loop runs under `jax.lax.scan` without host syncs or recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from cosmos_jax.scheduler_config import SchedulerConfig

_KARRAS_RHO = 7.0
_FIRST_SIGMA_EPS = 1e-6


class StepCoefficients(NamedTuple):
    """Per-step float32/bool scalars of the UniPC update, each of shape [N] (N = number of steps).

    Step i: `x0 = x − sigma·v`; corrector (UniC, when `corr_apply`) from the last sample towards σ_i;
    predictor (UniP) from σ_i to σ_{i+1}. Each update is `ratio·x − alpha_phi·m0 − alpha_phi·(higher-order
    terms)`: with bh2, B(h) = expm1(−h) = h·φ1(h), so one scalar `alpha_phi = α_target·expm1(−h)` serves both.
    """

    sigma: ArrayLike
    corr_apply: ArrayLike
    corr_second_order: ArrayLike
    corr_ratio: ArrayLike
    corr_alpha_phi: ArrayLike
    corr_rk: ArrayLike
    corr_rho_prev: ArrayLike
    corr_rho_this: ArrayLike
    pred_second_order: ArrayLike
    pred_ratio: ArrayLike
    pred_alpha_phi: ArrayLike
    pred_rk: ArrayLike


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A host-side sampling schedule: `sigmas` float32 [N+1] (last 0), `timesteps` int64 [N], step scalars."""

    sigmas: np.ndarray
    timesteps: np.ndarray
    coefficients: StepCoefficients

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


class SchedulerState(NamedTuple):
    """UniPC state between steps (a pytree): the last two data predictions, the last sample, the step index."""

    model_output_last: jax.Array  # x0 at step i-1
    model_output_prev: jax.Array  # x0 at step i-2
    last_sample: jax.Array  # sample the previous predictor started from (after its correction)
    step_index: jax.Array  # int32 scalar


def _karras_flow_sigmas(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """Karras ρ=7 ramp between sigma_max and sigma_min (EDM sigmas), mapped to flow σ = s/(1+s). float64 [N]."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = config.sigma_min ** (1 / _KARRAS_RHO)
    max_inv_rho = config.sigma_max ** (1 / _KARRAS_RHO)
    edm_sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** _KARRAS_RHO
    return edm_sigmas / (edm_sigmas + 1)


def _shifted_flow_sigmas(config: SchedulerConfig, base_sigmas: np.ndarray) -> np.ndarray:
    """`shift·σ/(1+(shift−1)·σ)`, with σ_0 nudged below 1 by 1e-6 when it would be 1. float64 [N]."""
    shift = config.flow_shift
    sigmas = shift * base_sigmas / (1 + (shift - 1) * base_sigmas)
    if np.fabs(sigmas[0] - 1) < _FIRST_SIGMA_EPS:
        sigmas[0] -= _FIRST_SIGMA_EPS
    return sigmas


def _log_f32(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 log (what a libm `logf` gives); log(0) = -inf."""
    with np.errstate(divide="ignore"):
        return np.log(x.astype(np.float64)).astype(np.float32)


def _expm1_f32(x: np.float32) -> np.float32:
    """Correctly rounded float32 expm1; expm1(-inf) = -1."""
    return np.float32(np.expm1(np.float64(x)))


def _solve_2x2_f32(rk: np.float32, b1: np.float32, b2: np.float32) -> tuple[np.float32, np.float32]:
    """Solve [[1, 1], [rk, 1]]·ρ = [b1, b2] in float32 as torch.linalg.solve (MKL sgesv) does on CPU.

    LU with partial pivoting; the back substitution multiplies by reciprocals of the pivots.
    """
    one = np.float32(1.0)
    if abs(rk) > one:
        multiplier = one / rk
        rho_last = (b1 - multiplier * b2) * (one / (one - multiplier))
        return (b2 - rho_last) * (one / rk), rho_last
    rho_last = (b2 - rk * b1) * (one / (one - rk))
    return b1 - rho_last, rho_last


def _step_coefficients(sigmas: np.ndarray) -> StepCoefficients:
    """All per-step scalars for a float32 sigma table [N+1] (last entry 0), in the reference's float32 order."""
    f32 = np.float32
    num_steps = sigmas.shape[0] - 1
    alphas = (f32(1.0) - sigmas).astype(np.float32)
    lambdas = (_log_f32(alphas) - _log_f32(sigmas)).astype(np.float32)
    pred_order = np.array([1 if i == 0 or i == num_steps - 1 else 2 for i in range(num_steps)])

    def update_scalars(target: int, source: int) -> tuple[np.float32, np.float32, np.float32, np.float32]:
        h = f32(lambdas[target] - lambdas[source])
        phi_1 = _expm1_f32(-h)
        ratio = f32(sigmas[target] / sigmas[source])
        return h, phi_1, f32(alphas[target] * phi_1), ratio

    coeffs: dict[str, list[Any]] = {name: [] for name in StepCoefficients._fields}
    for i in range(num_steps):
        coeffs["sigma"].append(sigmas[i])

        h, phi_1, alpha_phi, ratio = update_scalars(i + 1, i)
        second = bool(pred_order[i] == 2)
        rk = f32(f32(lambdas[i - 1] - lambdas[i]) / h) if second else f32(1.0)
        coeffs["pred_second_order"].append(second)
        coeffs["pred_ratio"].append(ratio)
        coeffs["pred_alpha_phi"].append(alpha_phi)
        coeffs["pred_rk"].append(rk)

        apply = i > 0
        second = apply and bool(pred_order[i - 1] == 2)
        rk, rho_prev, rho_this = f32(1.0), f32(0.0), f32(0.5)
        if apply:
            h, phi_1, alpha_phi, ratio = update_scalars(i, i - 1)
        else:
            alpha_phi, ratio = f32(0.0), f32(0.0)
        if second:
            hh = f32(-h)
            rk = f32(f32(lambdas[i - 2] - lambdas[i - 1]) / h)
            h_phi_k = f32(f32(phi_1 / hh) - f32(1.0))
            b1 = f32(h_phi_k / phi_1)
            h_phi_k = f32(f32(h_phi_k / hh) - f32(0.5))
            b2 = f32(f32(h_phi_k * f32(2.0)) / phi_1)
            rho_prev, rho_this = _solve_2x2_f32(rk, b1, b2)
        coeffs["corr_apply"].append(apply)
        coeffs["corr_second_order"].append(second)
        coeffs["corr_ratio"].append(ratio)
        coeffs["corr_alpha_phi"].append(alpha_phi)
        coeffs["corr_rk"].append(rk)
        coeffs["corr_rho_prev"].append(rho_prev)
        coeffs["corr_rho_this"].append(rho_this)

    return StepCoefficients(
        **{
            name: np.array(values, dtype=bool if isinstance(values[0], bool) else np.float32)
            for name, values in coeffs.items()
        }
    )


def make_schedule(config: SchedulerConfig, num_steps: int, *, native_flow: bool = False) -> Schedule:
    """Sigmas, timesteps and step scalars as `UniPCMultistepScheduler.set_timesteps` builds them.

    - `use_karras_sigmas=True`: Karras EDM sigmas mapped to flow σ; `flow_shift` and `native_flow` are ignored
      (apart from N), as in the reference.
    - otherwise: σ = linspace(1, 1/T, N+1)[:-1] (or, with `native_flow`, the pipeline's
      `use_native_flow_schedule` sigmas linspace(1−1/T, 0, N+1)[:-1]), shifted by `flow_shift`.
    Timesteps are `σ·T` truncated to int64; the sigma table gets a final 0 and is float32.
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    train_steps = config.num_train_timesteps
    if config.use_karras_sigmas:
        sigmas = _karras_flow_sigmas(config, num_steps)
    else:
        if native_flow:
            base = np.linspace(1.0 - 1.0 / train_steps, 0.0, num_steps + 1)[:-1]
        else:
            base = np.linspace(1, 1 / train_steps, num_steps + 1)[:-1]
        sigmas = _shifted_flow_sigmas(config, base)
    timesteps = (sigmas * train_steps).astype(np.int64)
    table = np.concatenate([sigmas, [0]]).astype(np.float32)
    return Schedule(sigmas=table, timesteps=timesteps, coefficients=_step_coefficients(table))


def conditioning_timestep(schedule: Schedule, i: int | jax.Array, timestep_scale: float = 0.001) -> jax.Array:
    """The float32 time the transformer is conditioned on at step i: `int(σ_i·T) · timestep_scale` (docs/model.md, "Integer timesteps").

    The reference multiplies the int64 timestep by the scale in float32 (`float32(t) * float32(scale)`).
    """
    timesteps = jnp.asarray(schedule.timesteps.astype(np.int32))
    return timesteps[i].astype(jnp.float32) * jnp.float32(timestep_scale)


def init_state(sample_shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> SchedulerState:
    """A fresh state for samples of `sample_shape` (history zeros, step 0)."""
    zeros = jnp.zeros(sample_shape, dtype)
    return SchedulerState(zeros, zeros, zeros, jnp.zeros((), jnp.int32))


def step(
    coefficients: StepCoefficients, state: SchedulerState, model_output_velocity: jax.Array, sample: jax.Array
) -> tuple[jax.Array, SchedulerState]:
    """One UniPC step at `state.step_index`: velocity v and sample x (same shape, any rank) → next sample.

    Arithmetic is in the state dtype (float32 for parity). Jittable; the step index is traced.
    """
    if model_output_velocity.shape != sample.shape or sample.shape != state.last_sample.shape:
        raise ValueError(
            f"shape mismatch: velocity {model_output_velocity.shape}, sample {sample.shape}, "
            f"scheduler state {state.last_sample.shape}"
        )
    dtype = state.last_sample.dtype
    c = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[state.step_index], coefficients)
    scalar = lambda a: a.astype(dtype)  # noqa: E731
    x = sample.astype(dtype)
    v = model_output_velocity.astype(dtype)

    model_t = x - scalar(c.sigma) * v
    m0, m1 = state.model_output_last, state.model_output_prev

    corrected_base = scalar(c.corr_ratio) * state.last_sample - scalar(c.corr_alpha_phi) * m0
    d1_this = model_t - m0
    first_order_res = scalar(c.corr_rho_this) * d1_this
    second_order_res = scalar(c.corr_rho_prev) * ((m1 - m0) / scalar(c.corr_rk)) + first_order_res
    correction = jnp.where(c.corr_second_order, second_order_res, first_order_res)
    corrected = corrected_base - scalar(c.corr_alpha_phi) * correction
    x = jnp.where(c.corr_apply, corrected, x)

    predicted_base = scalar(c.pred_ratio) * x - scalar(c.pred_alpha_phi) * model_t
    pred_res = jnp.asarray(0.5, dtype) * ((m0 - model_t) / scalar(c.pred_rk))
    predicted = jnp.where(c.pred_second_order, predicted_base - scalar(c.pred_alpha_phi) * pred_res, predicted_base)

    new_state = SchedulerState(
        model_output_last=model_t,
        model_output_prev=m0,
        last_sample=x,
        step_index=state.step_index + 1,
    )
    return predicted.astype(sample.dtype), new_state

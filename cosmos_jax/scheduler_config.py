"""`SchedulerConfig`: a pipeline's `scheduler/scheduler_config.json` (diffusers' `UniPCMultistepScheduler`).

Plain data, read and written by the checkpoint code (`cosmos_jax.convert`) and used by the sampler
(`cosmos_jax.sampling.scheduler`), so it sits below both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

_CLASS_NAME = "UniPCMultistepScheduler"
_DIFFUSERS_VERSION = "0.42.1"


class SchedulerConfigError(ValueError):
    """A scheduler config key is unknown, or holds a value outside the configuration Cosmos 3 uses."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """`scheduler/scheduler_config.json` of a Cosmos 3 pipeline. Field names are the diffusers config keys.

    Defaults are diffusers' own, so a partial JSON file means what it means to diffusers (and the bare defaults,
    an epsilon-prediction scheduler, are rejected); `SchedulerConfig.cosmos3()` is the converter's config.
    Keys that only matter for non-flow schedules (betas, spacing) are kept so a config round-trips unchanged.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    def __post_init__(self) -> None:
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))
        required = {
            "solver_order": 2,
            "prediction_type": "flow_prediction",
            "thresholding": False,
            "predict_x0": True,
            "solver_type": "bh2",
            "lower_order_final": True,
            "disable_corrector": (),
            "solver_p": None,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "use_flow_sigmas": True,
            "final_sigmas_type": "zero",
            "rescale_betas_zero_snr": False,
            "use_dynamic_shifting": False,
            "shift_terminal": None,
        }
        for key, supported in required.items():
            value = getattr(self, key)
            if value != supported or type(value) is not type(supported):
                raise SchedulerConfigError(
                    f"scheduler config {key}={value!r} is not supported: Cosmos 3's UniPC flow scheduler needs "
                    f"{key}={supported!r}"
                )
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise SchedulerConfigError(f"num_train_timesteps must be a positive int, got {self.num_train_timesteps!r}")
        if not float(self.flow_shift) > 0:
            raise SchedulerConfigError(f"flow_shift must be > 0, got {self.flow_shift!r}")
        if self.use_karras_sigmas:
            for key in ("sigma_min", "sigma_max"):
                value = getattr(self, key)
                if value is None or not float(value) > 0:
                    raise SchedulerConfigError(
                        f"{key}={value!r}: the Karras flow schedule needs positive sigma_min and sigma_max"
                    )
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise SchedulerConfigError(f"beta_schedule={self.beta_schedule!r} is not a diffusers beta schedule")
        if self.timestep_spacing not in ("linspace", "leading", "trailing"):
            raise SchedulerConfigError(f"timestep_spacing={self.timestep_spacing!r} is not a diffusers spacing")
        if self.time_shift_type != "exponential":
            raise SchedulerConfigError(f"time_shift_type={self.time_shift_type!r} is not supported")

    @classmethod
    def cosmos3(cls, **overrides: Any) -> SchedulerConfig:
        """The config the Cosmos 3 converter writes (Karras σ in [0.147, 200] mapped to flow σ), plus overrides.

        NVIDIA's video recipe is `cosmos3(use_karras_sigmas=False, flow_shift=10.0)`.
        """
        base = {
            "use_karras_sigmas": True,
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
            "sigma_max": 200.0,
            "sigma_min": 0.147,
        }
        return cls.from_dict({**base, **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a diffusers config dict; `_`-prefixed metadata is ignored, unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        class_name = data.get("_class_name", _CLASS_NAME)
        if class_name != _CLASS_NAME:
            raise SchedulerConfigError(f"_class_name={class_name!r}: only {_CLASS_NAME} configs are supported")
        unknown = sorted(k for k in data if not k.startswith("_") and k not in names)
        if unknown:
            raise SchedulerConfigError(f"unknown scheduler config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SchedulerConfig:
        """Read `scheduler_config.json` (or the folder holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"scheduler config not found: {path}")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config dict (JSON-ready), with `_class_name` and `_diffusers_version`."""
        out: dict[str, Any] = {"_class_name": _CLASS_NAME, "_diffusers_version": _DIFFUSERS_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write `scheduler_config.json` (a folder path gets the file inside it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

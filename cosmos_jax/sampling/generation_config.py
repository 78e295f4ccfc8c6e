"""Sampling defaults from a model folder's generation_config.json, resolved as transformers and vLLM do.

Rules: `do_sample` false or absent (or no file) means greedy decoding; with `do_sample` true the file's
temperature / top_k / top_p apply (transformers' defaults 1.0 / 50 / 1.0 for keys it leaves out).
`presence_penalty` is read when the file has it (0 otherwise). A value given on the command line wins. At
temperature 0 decoding is plain argmax: the presence penalty applies only when it was given explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

FILE = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 512
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The sampling settings of one run and, per setting, where its value came from."""

    temperature: float
    top_k: int
    top_p: float
    presence_penalty: float
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    sources: Mapping[str, str]
    ignored: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line such as `temperature 0.7 (--temperature), top_k 20 (generation_config.json), ...` (top_k and
        top_p left out at temperature 0, where they do nothing)."""
        names = ("temperature", "top_k", "top_p", "presence_penalty", "max_new_tokens")
        if self.temperature == 0:
            names = tuple(n for n in names if n not in ("top_k", "top_p"))
        parts = [f"{name} {getattr(self, name):g} ({self.sources[name]})" for name in names]
        return ", ".join(parts)


def read(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The folder's generation_config.json as a dict ({} when there is none); ValueError naming the file."""
    path = os.path.join(model_dir, FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def _number(raw: Mapping[str, Any], key: str, path: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: {key} must be a finite number, got {value!r}")
    return float(value)


def resolve(model_dir: str | os.PathLike, *, temperature: float | None = None, top_k: int | None = None,
            top_p: float | None = None, presence_penalty: float | None = None,
            max_new_tokens: int | None = None, tokenizer_eos: int | None = None) -> Resolved:
    """Command-line values (None = not given) over the folder's generation_config.json over the built-in rules."""
    raw = read(model_dir)
    where = FILE if raw else f"no {FILE}"
    path = os.path.join(model_dir, FILE)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    sampling = bool(raw.get("do_sample", False))
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "presence_penalty": presence_penalty,
             "max_new_tokens": max_new_tokens}
    for name, value in given.items():
        if value is not None:
            values[name], sources[name] = value, f"--{name.replace('_', '-')}"
            continue
        stored = _number(raw, name, path)
        if name == "temperature" and not sampling:
            values[name], sources[name] = 0.0, f"{where}: do_sample {'false' if raw else 'off'}, greedy"
        elif stored is not None and (sampling or name in ("presence_penalty", "max_new_tokens")):
            values[name], sources[name] = stored, FILE
        elif name in _SAMPLING_DEFAULTS:
            values[name], sources[name] = _SAMPLING_DEFAULTS[name], "transformers' default"
        elif name == "max_new_tokens":
            values[name], sources[name] = DEFAULT_MAX_NEW_TOKENS, "built-in default"
        else:
            values[name], sources[name] = 0.0, "built-in default"
    if values["temperature"] == 0 and presence_penalty is None and values["presence_penalty"]:
        values["presence_penalty"], sources["presence_penalty"] = 0.0, "off at temperature 0 unless given"
    eos = raw.get("eos_token_id")
    eos_ids = {tokenizer_eos} if tokenizer_eos is not None else set()
    eos_ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    ignored = tuple(k for k, neutral in (("repetition_penalty", 1.0), ("min_p", 0.0))
                    if raw.get(k) not in (None, neutral))
    return Resolved(float(values["temperature"]), int(values["top_k"]), float(values["top_p"]),
                    float(values["presence_penalty"]), int(values["max_new_tokens"]), tuple(sorted(eos_ids)),
                    sources, ignored)

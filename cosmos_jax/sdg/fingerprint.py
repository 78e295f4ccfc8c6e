"""Fingerprints that tie an sdg dataset to what made it: the model folder, the jobs and the run settings.

The model's fingerprint hashes every JSON file of its folder (configs, weight indexes, the stats file) and
the name and size of every weight file, so it changes when a config, a shard or the stats change and is
cheap to compute for a multi-GB checkpoint; a run that loads the model quantized or with LoRA adapters
hashes those options too (each adapter by its path, scale and the sha256 of its files). The jobs'
fingerprint hashes the validated jobs (with their resolved paths) and the content of every file they read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from cosmos_jax.sdg.jobs import Job

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".ocdbt", ".zarray")
NO_MODEL_OPTIONS: dict[str, Any] = {"quantize": None, "merge_lora": False, "lora": []}


def cosmos_jax_version() -> str:
    """The installed cosmos-jax version ("unknown" when run from a source tree that is not installed)."""
    try:
        return metadata.version("cosmos-jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_fingerprint(folder: str | os.PathLike, options: Mapping[str, Any] | None = None) -> str:
    """sha256 (first 16 hex digits) of the folder's JSON files, its weight files' names and sizes and, when they
    change the weights (a quantize mode or adapters), the model options (`NO_MODEL_OPTIONS`' keys)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    if options and (options.get("quantize") or options.get("lora")):
        digest.update(f"options {json.dumps(dict(options), sort_keys=True)}\n".encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".json":
            digest.update(f"json {name}\n".encode())
            digest.update(path.read_bytes())
        elif path.suffix in _WEIGHT_SUFFIXES or "checkpoint" in path.parts[-1]:
            digest.update(f"weights {name} {path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def jobs_fingerprint(jobs: Sequence[Job], settings: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the jobs (without line numbers), the files they read and `settings`."""
    entries = []
    for job in jobs:
        data = {k: v for k, v in job.to_json().items() if k != "line"}
        data["files"] = {k: _file_digest(data[k]) for k in ("image", "video", "actions") if data.get(k)}
        entries.append(data)
    text = json.dumps({"jobs": entries, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

"""The work folder of an sdg run: what was asked, and every finished candidate, written so a kill loses nothing.

    DATASET.sdg-work/
        run.json                          the validated jobs, the settings and the fingerprints (written once)
        shard-PPPPP/cJJJJJ-SSSSSSSS.npz   one finished candidate (job index J, sample index S) of process P:
                                          frames, actions, scores, as one file written under a temporary name
                                          and renamed (a kill leaves a complete file or a temporary one)
        shard-PPPPP/done.json             process P finished its share
        merged/                           the dataset being assembled by the merge (renamed to DATASET)

A candidate is done when its file exists in any shard; a re-run skips it. A re-run whose run.json differs
(other jobs, model, model options or settings) is refused. The finished dataset keeps run.json as meta/cosmos_sdg/run.json,
so a re-run over it recognises it and does nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

RUN_FORMAT = "cosmos-jax sdg run"
RUN_FILE = "run.json"
META_DIR = "meta/cosmos_sdg"


def work_dir(out: str | os.PathLike) -> Path:
    """The work folder beside the dataset folder `out`."""
    out = Path(out)
    return out.with_name(out.name + ".sdg-work")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` under a temporary name in the same folder, flush it to disk, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def check_same_run(found: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    """ValueError unless `found` (a run.json read back) describes the same jobs, model and settings."""
    if found.get("format") != RUN_FORMAT:
        raise ValueError(f"{where} is not a cosmos-jax sdg run file")
    for key, what in (("jobs_fingerprint", "jobs (or the files they read, or --best-of/--min-consistency/"
                                           "--dtype/--critic)"),
                      ("model_fingerprint", "model (or --quantize/--lora/--merge-lora)")):
        if found.get(key) != wanted.get(key):
            detail = [f"{key} {found.get(key)} != {wanted.get(key)}"] + _settings_differences(found, wanted)
            raise ValueError(f"{where} was made from other {what} ({'; '.join(detail)}); "
                             "refusing to mix them: use another --out, or delete it to start over")


def _settings_differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'--flag found != wanted' for each run setting that differs (none when `wanted` has no settings)."""
    theirs, ours = found.get("settings") or {}, wanted.get("settings") or {}
    return [f"--{key.replace('_', '-')} {theirs.get(key)} != {value}" for key, value in sorted(ours.items())
            if theirs.get(key) != value]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One generated candidate as journaled: frames [F, H, W, 3] uint8; actions [F-1, A] float32 in model space
    (None for an unlabelled dataset); `record` the JSON-able rest (job, seed, index, mode, scores)."""

    job_index: int
    sample_index: int
    frames: np.ndarray
    actions: np.ndarray | None
    record: dict[str, Any]


def candidate_name(job_index: int, sample_index: int) -> str:
    return f"c{job_index:05d}-{sample_index:08d}.npz"


class Journal:
    """The work folder of one run (see the module docstring); `process` is this process's shard."""

    def __init__(self, root: Path, process: int = 0) -> None:
        self.root = Path(root)
        self.process = process

    @property
    def shard(self) -> Path:
        return self.root / f"shard-{self.process:05d}"

    def check(self, run: dict[str, Any]) -> bool:
        """True when the folder holds a run.json describing the same run, False when it holds none;
        ValueError when it describes another (`check_same_run`)."""
        path = self.root / RUN_FILE
        if not path.is_file():
            return False
        check_same_run(read_json(path), run, path)
        return True

    def start(self, run: dict[str, Any]) -> None:
        """Create the folder and run.json, or check an existing run.json describes the same run."""
        if not self.check(run):
            atomic_write_json(self.root / RUN_FILE, run)
        self.shard.mkdir(parents=True, exist_ok=True)
        for stale in self.shard.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
        (self.shard / "done.json").unlink(missing_ok=True)

    def run(self) -> dict[str, Any]:
        path = self.root / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {self.root} is not an sdg work folder")
        return read_json(path)

    def shards(self) -> list[Path]:
        return sorted(p for p in self.root.glob("shard-*") if p.is_dir())

    def done(self) -> set[tuple[int, int]]:
        """(job index, sample index) of every journaled candidate, over all shards."""
        found = set()
        for shard in self.shards():
            for path in shard.glob("c*.npz"):
                job, sample = path.stem[1:].split("-")
                found.add((int(job), int(sample)))
        return found

    def write(self, candidate: Candidate) -> None:
        arrays = {"frames": candidate.frames,
                  "record": np.frombuffer(json.dumps(candidate.record, sort_keys=True).encode(), np.uint8)}
        if candidate.actions is not None:
            arrays["actions"] = np.asarray(candidate.actions, np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.shard / candidate_name(candidate.job_index, candidate.sample_index),
                           buffer.getvalue())

    def _path(self, job_index: int, sample_index: int) -> Path:
        name = candidate_name(job_index, sample_index)
        for shard in self.shards():
            if (shard / name).is_file():
                return shard / name
        raise FileNotFoundError(f"{self.root}: candidate {sample_index} of job {job_index} was not generated; "
                                "re-run the same command to finish it")

    def read_record(self, job_index: int, sample_index: int) -> dict[str, Any]:
        """A journaled candidate's record only (its frames stay on disk)."""
        with np.load(self._path(job_index, sample_index), allow_pickle=False) as data:
            return json.loads(bytes(data["record"]).decode())

    def read(self, job_index: int, sample_index: int) -> Candidate:
        with np.load(self._path(job_index, sample_index), allow_pickle=False) as data:
            record = json.loads(bytes(data["record"]).decode())
            actions = np.asarray(data["actions"]) if "actions" in data else None
            return Candidate(job_index, sample_index, np.asarray(data["frames"]), actions, record)

    def finish_shard(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.shard / "done.json", summary)

    def finished_shards(self) -> set[int]:
        return {int(p.name.split("-")[1]) for p in self.shards() if (p / "done.json").is_file()}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def finished_run(out: Path) -> dict[str, Any] | None:
    """The run.json of a finished sdg dataset at `out` (None when `out` does not exist); ValueError when `out`
    exists but is not one."""
    if not out.exists():
        return None
    path = out / META_DIR / RUN_FILE
    if not path.is_file():
        raise ValueError(f"--out {out} exists and is not a cosmos-jax sdg dataset; choose another folder")
    return read_json(path)

"""The /v1/videos job records and their results, persisted under the results folder.

Layout: `<results>/<job id>/job.json` (the record) beside the job's outputs (`video.mp4` or `video.png`,
`video.wav` with sound, `video.actions.json` / `.npy` / `.png` in the action modes, and `video.latents.npy`, the
final latents [1, C, T, h, w] float32). Every file is written under a temporary name and renamed into place, and
a record says "completed" only after all its outputs are in place, so a finished job survives a crash or restart
whole. On start, records left "queued" or "in_progress" by a
server that stopped are marked "failed" with a message saying so: no job is lost without a word.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_jax.sampling import media
from cosmos_jax.sampling.generate import GenerationResult

QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
_JOB_ID = re.compile(r"^video_[0-9a-f]{32}$")
RECORD = "job.json"
CONTENT = {
    "video": ("video.mp4", "video/mp4"),
    "image": ("video.png", "image/png"),
    "audio": ("video.wav", "audio/wav"),
    "actions": ("video.actions.json", "application/json"),
    "actions_npy": ("video.actions.npy", "application/octet-stream"),
    "latents": ("video.latents.npy", "application/octet-stream"),
}
"""The downloadable outputs of a job: variant -> (file name, media type)."""


def valid_job_id(job_id: str) -> bool:
    return bool(_JOB_ID.match(job_id))


class JobStore:
    """Job records in memory, mirrored to disk on every change of status; thread-safe."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self.recovered_failed = 0
        for folder in sorted(self.root.iterdir()):
            if not (valid_job_id(folder.name) and (folder / RECORD).is_file()):
                continue
            record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
            if record.get("status") in (QUEUED, IN_PROGRESS):
                record.update(status=FAILED, progress=record.get("progress", 0), error={
                    "message": f"the server stopped while this job was {record['status']}; it was not run to the "
                               f"end (submit it again)", "status": 500})
                record["failed_at"] = int(time.time())
                self._write(record)
                self.recovered_failed += 1
            self._jobs[record["id"]] = record

    def _write(self, record: dict[str, Any]) -> None:
        media.write_json(self.root / record["id"] / RECORD, record)

    def create(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A new queued job (persisted before it is returned) for the JSON-able request `fields`."""
        job_id = f"video_{uuid.uuid4().hex}"
        record = {"id": job_id, "object": "video", "status": QUEUED, "progress": 0, "compiling": False,
                  "created_at": int(time.time()), "request": fields, "error": None, "content": []}
        with self._lock:
            self._write(record)
            self._jobs[job_id] = record
            return copy.deepcopy(record)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._jobs.get(job_id)
            return copy.deepcopy(record) if record is not None else None

    def count(self, status: str) -> int:
        with self._lock:
            return sum(r["status"] == status for r in self._jobs.values())

    def start(self, job_id: str, compiling: bool, batch_size: int) -> None:
        with self._lock:
            record = self._jobs[job_id]
            record.update(status=IN_PROGRESS, compiling=compiling, batch_size=batch_size,
                          started_at=int(time.time()))
            self._write(record)

    def progress(self, job_id: str, fraction: float) -> None:
        """In memory only: progress is not worth a disk write per step."""
        with self._lock:
            self._jobs[job_id]["progress"] = int(round(100 * fraction))

    def fail(self, job_id: str, message: str, status: int = 500) -> None:
        with self._lock:
            record = self._jobs[job_id]
            record.update(status=FAILED, compiling=False, error={"message": message, "status": status},
                          failed_at=int(time.time()))
            self._write(record)

    def complete(self, job_id: str, result: GenerationResult, domain: str | None) -> None:
        """Write the job's outputs, then mark it completed."""
        folder = self.root / job_id
        stem = str(folder / "video")
        written = media.write_video_outputs(stem, result.video, result.fps, result.sound, result.sample_rate)
        if result.actions is not None:
            written += media.write_actions(stem, result.actions, domain=domain, mode=result.mode)
        written.append(f"{stem}.latents.npy")
        media.write_npy(written[-1], np.asarray(result.latents, np.float32))
        names = {os.path.basename(p) for p in written}
        content = [variant for variant, (name, _) in CONTENT.items() if name in names]
        with self._lock:
            record = self._jobs[job_id]
            record.update(status=COMPLETED, progress=100, compiling=False, content=content, mode=result.mode,
                          completed_at=int(time.time()), timings={k: round(v, 4) for k, v in result.timings.items()})
            if result.actions is not None:
                record["actions_shape"] = list(np.shape(result.actions))
            self._write(record)

    def content(self, job_id: str, variant: str) -> tuple[Path, str] | None:
        """(path, media type) of a completed job's output, or None when it has no such output."""
        record = self.get(job_id)
        if record is None or record["status"] != COMPLETED or variant not in record["content"]:
            return None
        name, media_type = CONTENT[variant]
        return self.root / job_id / name, media_type

    def delete(self, job_id: str) -> bool:
        """Remove a finished (completed or failed) job and its files; False when there is no such job."""
        with self._lock:
            record = self._jobs.pop(job_id, None)
            if record is None:
                return False
            shutil.rmtree(self.root / job_id, ignore_errors=True)
            return True

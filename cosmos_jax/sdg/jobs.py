"""The jobs file of `cosmos-jax sdg`: one JSON object per line, each a generation job, checked line by line.

A job's fields are `cosmos-jax generate`'s flags in snake_case (`id`, `mode`, `prompt`, `negative_prompt`,
`image`, `video`, `actions`, `domain`, `chunk`, `resolution_tier`, `view_point`, `condition_frames`,
`num_frames`, `height`, `width`, `fps`, `steps`, `guidance`, `seed`) plus `samples` (episodes to make),
`chunks` (action chunks chained into one long episode: policy and forward_dynamics only) and `camera` (the
dataset's video key; default `observation.images.<view_point>`). Relative paths are resolved against the
jobs file's folder. Blank lines and lines starting with `#` are skipped.

Checks that need no model run here (`read_jobs`): JSON, known fields, types, the mode and the fields it
needs, files that exist and load, action widths against the domain, duplicate ids, and what one dataset must
share (one fps, one camera, one action width, every job labelled or none). Every error is a `JobError`
naming the line and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_jax.sampling.prompts import ACTION_MODES, EMBODIMENT_DOMAINS, VIEWPOINT_SENTENCES, raw_action_dim
from cosmos_jax.sampling.request import GenerationRequest

VISION_MODES = ("text2video", "image2video", "video2video")
MODES = (*ACTION_MODES, *VISION_MODES)
CHAINED_MODES = ("policy", "forward_dynamics")

_INT_FIELDS = ("chunk", "resolution_tier", "num_frames", "height", "width", "steps", "seed", "samples", "chunks")
_NUMBER_FIELDS = ("fps", "guidance")
_STRING_FIELDS = ("id", "mode", "prompt", "negative_prompt", "image", "video", "actions", "domain", "view_point",
                  "camera")
FIELDS = (*_STRING_FIELDS, *_INT_FIELDS, *_NUMBER_FIELDS, "condition_frames")
_POSITIVE = ("chunk", "steps", "samples", "chunks", "num_frames", "height", "width")
_TIERS = (256, 480, 704, 720)


class JobError(ValueError):
    """A bad job: `line` (1-based, in the jobs file), `field` (None: the whole line) and what is wrong."""

    def __init__(self, path: str | os.PathLike, line: int, field: str | None, message: str) -> None:
        self.path, self.line, self.field, self.message = os.fspath(path), line, field, message
        where = f"{self.path}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Job:
    """One validated job (paths absolute, defaults filled in). `line` is its line in the jobs file."""

    line: int
    id: str
    mode: str
    prompt: str
    negative_prompt: str | None = None
    image: str | None = None
    video: str | None = None
    actions: str | None = None
    domain: str | None = None
    chunk: int = 16
    resolution_tier: int = 480
    view_point: str = "ego_view"
    condition_frames: tuple[int, ...] = (0, 1)
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float = 24.0
    steps: int = 35
    guidance: float | None = None
    seed: int = 0
    samples: int = 1
    chunks: int = 1
    camera: str | None = None

    @property
    def action_mode(self) -> str | None:
        return self.mode if self.mode in ACTION_MODES else None

    @property
    def labelled(self) -> bool:
        """Whether the job's episodes carry actions (every action mode; vision modes with a domain)."""
        return self.domain is not None

    @property
    def idm_labelled(self) -> bool:
        """Whether the actions are read from the clip by inverse dynamics (consistency: forward re-render)."""
        return self.domain is not None and self.mode in ("inverse_dynamics", *VISION_MODES)

    @property
    def camera_key(self) -> str:
        return self.camera or f"observation.images.{self.view_point}"

    @property
    def resolved_guidance(self) -> float:
        """The guidance scale: as given, else 1 in action modes and 6 in vision modes (as `generate`)."""
        if self.guidance is not None:
            return float(self.guidance)
        return 1.0 if self.action_mode else 6.0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["condition_frames"] = list(self.condition_frames)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(**{**data, "condition_frames": tuple(data["condition_frames"])})


def load_actions(path: str) -> np.ndarray:
    """A forward-dynamics actions file: .npy [T, A] without pickle, float32."""
    return np.asarray(np.load(path, allow_pickle=False), np.float32)


def request_for(job: Job, *, image: Any = None, actions: np.ndarray | None = None, seed: int | None = None
                ) -> GenerationRequest:
    """The generation request of a job's first chunk (or, with `image`/`actions`/`seed`, of a later one).
    `actions` are model-space rows for forward dynamics (default: the job's file, as given)."""
    if job.mode == "forward_dynamics" and actions is None:
        actions = load_actions(job.actions)
    vision = job.action_mode is None
    return GenerationRequest(
        job.prompt, job.negative_prompt,
        image=image if image is not None else job.image,
        video=None if image is not None else job.video,
        action_mode=job.action_mode, domain=None if vision else job.domain,
        actions=actions if job.mode == "forward_dynamics" else None,
        chunk=job.chunk, resolution_tier=job.resolution_tier, view_point=job.view_point,
        condition_frames=job.condition_frames, num_frames=job.num_frames if vision else None,
        height=job.height if vision else None, width=job.width if vision else None, fps=job.fps,
        steps=job.steps, guidance=job.resolved_guidance, seed=job.seed if seed is None else seed,
    )


# ----------------------------------------------------------------------------------------------- parsing


def _typed(path: Path, line: int, raw: dict[str, Any]) -> dict[str, Any]:
    """The raw fields after type checks (ints, numbers, strings, condition_frames)."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in FIELDS:
            raise JobError(path, line, name, f"unknown field; known fields are {', '.join(sorted(FIELDS))}")
        if value is None:
            continue
        if name in _INT_FIELDS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise JobError(path, line, name, f"must be an integer, got {value!r}")
            if name in _POSITIVE and value < 1:
                raise JobError(path, line, name, f"must be positive, got {value}")
            if name == "seed" and not 0 <= value < 2**32:
                raise JobError(path, line, name, f"must be in [0, 2**32), got {value}")
        elif name in _NUMBER_FIELDS:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise JobError(path, line, name, f"must be a finite number, got {value!r}")
        elif name in _STRING_FIELDS:
            if not isinstance(value, str) or not value:
                raise JobError(path, line, name, f"must be a non-empty string, got {value!r}")
        elif name == "condition_frames":
            if not (isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool)
                                                              and i >= 0 for i in value)):
                raise JobError(path, line, name, f"must be a non-empty list of non-negative integers, got {value!r}")
            value = tuple(value)
        out[name] = value
    return out


def _resolve(path: Path, line: int, fields: dict[str, Any]) -> None:
    """Resolve image/video/actions against the jobs file's folder and check they load."""
    for name in ("image", "video", "actions"):
        if name not in fields:
            continue
        target = Path(fields[name]).expanduser()
        target = target if target.is_absolute() else path.parent / target
        if not target.is_file():
            raise JobError(path, line, name, f"file not found: {target}")
        fields[name] = os.fspath(target.resolve())
    if "image" in fields:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(fields["image"]) as image:
                image.verify()
        except (OSError, UnidentifiedImageError) as e:
            raise JobError(path, line, "image", f"cannot read {fields['image']} as an image ({e})") from None


def _check_mode(path: Path, line: int, f: dict[str, Any]) -> None:
    mode = f.get("mode")
    if mode is None:
        raise JobError(path, line, "mode", f"missing; one of {', '.join(MODES)}")
    if mode not in MODES:
        raise JobError(path, line, "mode", f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if "prompt" not in f:
        raise JobError(path, line, "prompt", "missing (the task text of the episodes)")
    needs = {"image2video": "image", "video2video": "video", "inverse_dynamics": "video",
             "forward_dynamics": "actions"}
    if mode in needs and needs[mode] not in f:
        raise JobError(path, line, needs[mode], f"mode {mode} needs {needs[mode]!r}")
    if mode in ("policy", "forward_dynamics") and "image" not in f and "video" not in f:
        raise JobError(path, line, "image", f"mode {mode} needs a first frame: 'image' (or 'video')")
    if "image" in f and "video" in f:
        raise JobError(path, line, "video", "give either 'image' or 'video', not both")
    unused = {"text2video": ("image", "video"), "image2video": ("video",), "video2video": ("image",)}
    for name in unused.get(mode, ()):
        if name in f:
            raise JobError(path, line, name, f"mode {mode} does not read {name!r}")
    if "actions" in f and mode != "forward_dynamics":
        raise JobError(path, line, "actions", f"only forward_dynamics reads actions, not {mode}")
    if mode in ACTION_MODES:
        if "domain" not in f:
            raise JobError(path, line, "domain", f"mode {mode} needs a domain; one of {sorted(EMBODIMENT_DOMAINS)}")
        for name in ("num_frames", "height", "width"):
            if name in f:
                raise JobError(path, line, name, f"in mode {mode} the clip comes from chunk and resolution_tier")
    if f.get("chunks", 1) > 1 and mode not in CHAINED_MODES:
        raise JobError(path, line, "chunks", f"long episodes chain policy or forward_dynamics chunks, not {mode}")
    if "domain" in f:
        domain = f["domain"]
        try:
            width = raw_action_dim(domain)
        except ValueError as e:
            raise JobError(path, line, "domain", str(e)) from None
        if mode == "forward_dynamics":
            try:
                actions = load_actions(f["actions"])
            except (OSError, ValueError) as e:
                raise JobError(path, line, "actions", f"cannot read {f['actions']} as .npy ({e})") from None
            if actions.ndim != 2 or actions.shape[0] < 1:
                raise JobError(path, line, "actions", f"must be [T >= 1, {width}], got shape {list(actions.shape)}")
            if actions.shape[1] != width:
                raise JobError(path, line, "actions", f"has {actions.shape[1]} channels but domain {domain!r} "
                                                      f"has {width}")
            if not np.isfinite(actions).all():
                raise JobError(path, line, "actions", "contains NaN or Inf")
    if "view_point" in f and f["view_point"] not in VIEWPOINT_SENTENCES:
        raise JobError(path, line, "view_point", f"unknown view point; one of {sorted(VIEWPOINT_SENTENCES)}")
    if "resolution_tier" in f and f["resolution_tier"] not in _TIERS:
        raise JobError(path, line, "resolution_tier", f"one of {list(_TIERS)}, got {f['resolution_tier']}")


_REQUEST_FIELDS = {"action_mode": "mode", "actions": "actions", "chunk": "chunk", "num_frames": "num_frames",
                   "steps": "steps", "guidance": "guidance", "fps": "fps", "condition_frames": "condition_frames"}


def _check_request(path: Path, line: int, job: Job) -> None:
    """Build the job's request (the same checks `generate` makes); its error names the field it starts with."""
    try:
        request_for(job)
    except ValueError as e:
        text = str(e)
        first = text.split(" ", 1)[0]
        raise JobError(path, line, _REQUEST_FIELDS.get(first), text) from None


def parse_line(path: Path, line: int, text: str) -> Job:
    """One non-blank line -> a Job (default id: 'job-<line>'); JobError naming the line and field."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise JobError(path, line, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise JobError(path, line, None, f"a job is a JSON object, got {type(raw).__name__}")
    fields = _typed(path, line, raw)
    _resolve(path, line, fields)
    _check_mode(path, line, fields)
    fields.setdefault("id", f"job-{line}")
    if "fps" in fields:
        fields["fps"] = float(fields["fps"])
    if "guidance" in fields:
        fields["guidance"] = float(fields["guidance"])
    job = Job(line=line, **fields)
    _check_request(path, line, job)
    return job


def _check_together(path: Path, jobs: Sequence[Job]) -> list[JobError]:
    """What every job of one dataset shares: unique ids, one fps (an integer), one camera key, one action
    width, and either every job labelled (a domain) or none. Errors name the later job's line."""
    errors: list[JobError] = []
    seen: dict[str, int] = {}
    first = jobs[0] if jobs else None
    for job in jobs:
        if job.id in seen:
            errors.append(JobError(path, job.line, "id", f"duplicate id {job.id!r} (first on line {seen[job.id]})"))
            continue
        seen[job.id] = job.line
        if not float(job.fps).is_integer():
            errors.append(JobError(path, job.line, "fps", f"a LeRobot dataset has an integer fps, got {job.fps}"))
        elif job.fps != first.fps:
            errors.append(JobError(path, job.line, "fps", f"{job.fps:g} differs from line {first.line}'s "
                                                          f"{first.fps:g} (one dataset, one fps)"))
        elif job.camera_key != first.camera_key:
            errors.append(JobError(path, job.line, "camera", f"{job.camera_key!r} differs from line "
                                                             f"{first.line}'s {first.camera_key!r} (every episode "
                                                             f"of a LeRobot dataset has every camera)"))
        elif job.labelled != first.labelled:
            errors.append(JobError(path, job.line, "domain", "either every job names a domain (an action-labelled "
                                                             f"dataset) or none; line {first.line} "
                                                             f"{'does' if first.labelled else 'does not'}"))
        elif job.labelled and raw_action_dim(job.domain) != raw_action_dim(first.domain):
            errors.append(JobError(path, job.line, "domain",
                                   f"{job.domain!r} has {raw_action_dim(job.domain)} action channels, line "
                                   f"{first.line}'s {first.domain!r} has {raw_action_dim(first.domain)} (one "
                                   f"dataset, one action width)"))
    return errors


def read_jobs(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[Job], list[JobError]]:
    """Every job of a jobs file, checked. Returns (jobs, errors): without `skip_bad` the first error is raised
    after every line has been read (all errors are in it); with it, bad lines are dropped and returned."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--jobs file not found: {path}")
    jobs: list[Job] = []
    errors: list[JobError] = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            jobs.append(parse_line(path, number, text))
        except JobError as e:
            errors.append(e)
    together = _check_together(path, jobs)
    bad = {e.line for e in together}
    jobs = [j for j in jobs if j.line not in bad]
    errors = sorted(errors + together, key=lambda e: e.line)
    if errors and not skip_bad:
        raise JobErrors(errors)
    if not jobs:
        raise JobErrors(errors or [JobError(path, 0, None, "holds no job")])
    return jobs, errors


class JobErrors(ValueError):
    """Every bad line of a jobs file (one line each)."""

    def __init__(self, errors: Sequence[JobError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

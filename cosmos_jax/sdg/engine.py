"""The sdg run: validated jobs -> same-shape batches -> generation, labels, scores -> the journal -> the dataset.

Every job is expanded into candidates (job order; slot s of a job owns sample indices s·N .. s·N + N − 1
under `--best-of N`), and the candidates into same-shape batches of at most `batch_size`
(`Cosmos3Pipeline.prepare_batches`). The batch grouping is computed over every candidate, done or not, and is the
same on every process; process p runs the batches b with b % process_count == p on its local devices and
journals what it made. So the batches, and with them every candidate's numbers, do not depend on how
often the run was interrupted, and sample k of a job draws its noise from fold_in(key(seed), k) whatever the
batch, the mesh or the process (`cosmos_jax.sampling.batch`).

For each batch, every sample goes through:
1. generation (chunk 0); long episodes (`chunks: K`, policy and forward dynamics) then chain chunks 1..K−1,
   chunk c starting from the last frame of chunk c−1 (as uint8, as the dataset stores it) with seed
   `seed + c`, forward dynamics reading the given action rows c·chunk .. (c+1)·chunk;
2. labels: text/image/video→video jobs with a domain read their actions from the clip by inverse dynamics;
3. consistency (`cosmos_jax.sdg.consistency`): policy and forward-dynamics episodes are read back by inverse
   dynamics (chunk by chunk); inverse-dynamics-labelled episodes are re-rendered by forward dynamics from
   their first frame;
4. the critic (`--critic`, `cosmos_jax.sdg.critic`): the reasoner answers a fixed plausibility question about
   each candidate's frames, greedily, one clip at a time. It only reads the frames, so the episodes, their
   scores and the selection (by consistency alone) are the same with and without it.
The labelling pass draws its noise from the job's seed (so `generate --action-mode inverse_dynamics` on the
episode's video with that seed reproduces the labels). The consistency passes must not reuse the noise that
made the episode (a read-back with the same noise repeats it): they use `helper_seed(seed, pass, chunk)`.
The helper passes run with guidance 1 and as many steps as the job, and return latents only (no decode).
Process 0 merges every shard into the dataset once all have finished (`cosmos_jax.sdg.merge`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cosmos_jax.datasets.normalization import ActionNormalizer
from cosmos_jax.sampling.batch import PreparedBatch, Sample
from cosmos_jax.sampling.generate import Cosmos3Pipeline, GenerationResult
from cosmos_jax.sampling.media import to_uint8
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.sdg import consistency
from cosmos_jax.sdg.critic import Answerer, critique
from cosmos_jax.sdg.fingerprint import NO_MODEL_OPTIONS, cosmos_jax_version
from cosmos_jax.sdg.jobs import Job, JobError, load_actions, request_for
from cosmos_jax.sdg.journal import META_DIR, RUN_FILE, Candidate, Journal
from cosmos_jax.sdg.selection import choose, slot_samples


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run is asked beyond the jobs. `best_of`, `min_consistency`, `dtype` and `critic` change the
    dataset (so they enter the run's fingerprint); `batch_size` and the mesh only change the speed."""

    best_of: int = 1
    min_consistency: float | None = None
    dtype: str = "float32"
    batch_size: int | None = None
    critic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.best_of, int) or self.best_of < 1:
            raise ValueError(f"--best-of must be a positive integer, got {self.best_of!r}")
        if self.min_consistency is not None and not 0.0 <= self.min_consistency <= 1.0:
            raise ValueError(f"--min-consistency must be in [0, 1] (scores are exp(-error)), got "
                             f"{self.min_consistency!r}")

    def fingerprinted(self) -> dict[str, Any]:
        return {"best_of": self.best_of, "min_consistency": self.min_consistency, "dtype": self.dtype,
                "critic": self.critic}


@dataclasses.dataclass
class _Episode:
    """One sample on its way through the passes."""

    job: Job
    job_index: int
    sample_index: int
    chunks: list[GenerationResult]
    actions: np.ndarray | None = None
    scores: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def frames(self) -> np.ndarray:
        """[K·chunk + 1, H, W, 3] uint8: chunk 0's frames, then each later chunk's without its first."""
        parts = [to_uint8(self.chunks[0].video)] + [to_uint8(r.video)[1:] for r in self.chunks[1:]]
        return np.concatenate(parts)


def frame_size(pipeline: Cosmos3Pipeline, request: GenerationRequest) -> tuple[int, int]:
    """(H, W) of the frames a job's episodes have (the decoded size of its latents)."""
    prep = pipeline.prepare(request)
    sf = pipeline.vae.config.spatial_compression
    return prep.latent_shape[1] * sf, prep.latent_shape[2] * sf


def model_actions(job: Job, normalizer: ActionNormalizer | None) -> np.ndarray:
    """A forward-dynamics job's actions in model space, [K·chunk, A]: the file (raw units when the model
    has stats), cut or padded with its last row to the episode's length."""
    actions = load_actions(job.actions)
    if normalizer is not None:
        actions = normalizer.to_model(actions).astype(np.float32)
    rows = job.chunks * job.chunk
    if actions.shape[0] < rows:
        actions = np.concatenate([actions, np.repeat(actions[-1:], rows - actions.shape[0], 0)])
    return np.ascontiguousarray(actions[:rows], np.float32)


def job_requests(pipeline: Cosmos3Pipeline, jobs: Sequence[Job], normalizer: ActionNormalizer | None,
                 jobs_path: str | os.PathLike) -> tuple[list[Job], list[GenerationRequest], list[JobError]]:
    """The first-chunk request of every job, checked against the model (prep) and against the first job's
    frame size; (jobs kept, their requests, errors naming the line of `jobs_path`)."""
    kept, requests, errors = [], [], []
    size: tuple[int, int] | None = None
    first_line = 0
    if pipeline.vae is None:
        raise ValueError("sdg writes videos: the model folder needs a vae/")
    for job in jobs:
        actions = model_actions(job, normalizer)[: job.chunk] if job.mode == "forward_dynamics" else None
        try:
            request = request_for(job, actions=actions)
            this = frame_size(pipeline, request)
        except (ValueError, FileNotFoundError, OSError) as e:
            errors.append(JobError(jobs_path, job.line, None, f"the model refuses it: {e}"))
            continue
        if size is None:
            size, first_line = this, job.line
        elif this != size:
            field = "height" if job.mode in ("text2video", "image2video", "video2video") else "image"
            errors.append(JobError(jobs_path, job.line, field,
                                   f"episodes would be {this[0]}x{this[1]}, line {first_line}'s are "
                                   f"{size[0]}x{size[1]} (one camera, one frame size)"))
            continue
        kept.append(job)
        requests.append(request)
    return kept, requests, errors


def episode_model_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The model options as an episode records them: quantize (None or the mode), lora (the `--lora` values,
    PATH:SCALE, that load the same adapters), merge_lora."""
    return {"quantize": options.get("quantize"), "merge_lora": bool(options.get("merge_lora")),
            "lora": [f"{a['path']}:{float(a['scale'])!r}" for a in options.get("lora", [])]}


def helper_seed(seed: int, name: str, chunk: int = 0) -> int:
    """The seed of a consistency pass (`name`, `chunk`) of a job with `seed`: 32 bits of sha256, so it shares
    no noise with the episode's own samples."""
    digest = hashlib.sha256(f"cosmos-jax sdg {name} {seed} {chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def candidates(jobs: Sequence[Job], best_of: int) -> list[tuple[int, int]]:
    """(job index, sample index) of every candidate, in (job order, sample index) order."""
    return [(j, index) for j, job in enumerate(jobs) for slot in range(job.samples)
            for index in slot_samples(slot, best_of)]


class Engine:
    """Runs the batches of one process (see the module docstring) and journals every candidate."""

    def __init__(self, pipeline: Cosmos3Pipeline, jobs: Sequence[Job], requests: Sequence[GenerationRequest],
                 settings: Settings, normalizer: ActionNormalizer | None, model_fingerprint: str,
                 model_options: Mapping[str, Any] | None = None, critic: Answerer | None = None) -> None:
        if settings.critic != (critic is not None):
            raise ValueError("give the critic's answer function exactly when settings.critic is on")
        self.pipeline = pipeline
        self.jobs = list(jobs)
        self.requests = list(requests)
        self.settings = settings
        self.normalizer = normalizer
        self.model_fingerprint = model_fingerprint
        self.model_options = dict(model_options or NO_MODEL_OPTIONS)
        self.critic = critic
        self.version = cosmos_jax_version()
        self._job_of = {id(r): j for j, r in enumerate(self.requests)}

    def batches(self) -> list[PreparedBatch]:
        """Every candidate in same-shape batches (the same grouping on every process and every re-run)."""
        samples = [Sample(self.requests[j], index) for j, index in candidates(self.jobs, self.settings.best_of)]
        return self.pipeline.prepare_batches(samples, self.settings.batch_size)

    def keys(self, batch: PreparedBatch) -> list[tuple[int, int]]:
        return [(self._job_of[id(s.request)], s.index) for s in batch.samples]

    def todo(self, done: set[tuple[int, int]], process: int, process_count: int) -> list[PreparedBatch]:
        """This process's batches (b % process_count == process) with a candidate not in `done`."""
        return [batch for number, batch in enumerate(self.batches())
                if number % process_count == process and not all(key in done for key in self.keys(batch))]

    def run(self, batches: Sequence[PreparedBatch], journal: Journal,
            progress: Callable[[list[dict[str, Any]]], None]) -> int:
        """Generate every batch and journal its candidates that are not journaled yet; `progress(records)`
        after each batch. Returns the number of candidates journaled."""
        done = journal.done()
        made = 0
        for batch in batches:
            start = time.perf_counter()
            episodes, checking = self.generate(batch)
            seconds = (time.perf_counter() - start) / len(episodes)
            records = []
            for episode, key in zip(episodes, self.keys(batch)):
                if key in done:
                    continue
                candidate = self.candidate(episode, seconds, checking / len(episodes), self._critique(episode))
                journal.write(candidate)
                records.append(candidate.record)
            made += len(records)
            progress(records)
        return made

    def warm(self, batch: PreparedBatch) -> None:
        """Every pass of one batch and the critic of its episodes, as `run` makes them, journaling nothing (under
        `cosmos_jax.aot.compile_only()`: compiling every program and running none, for `sdg --warm-only`)."""
        episodes, _ = self.generate(batch)
        for episode in episodes:
            self._critique(episode)

    # ------------------------------------------------------------------------------------------ passes

    def generate(self, batch: PreparedBatch) -> tuple[list[_Episode], float]:
        """Every pass of one batch (module docstring); (the episodes in batch order, the seconds the
        consistency passes took)."""
        results = self._run(list(batch.samples), batch)
        episodes = [_Episode(self.jobs[self._job_of[id(s.request)]], self._job_of[id(s.request)], s.index, [r])
                    for s, r in zip(batch.samples, results)]
        self._chain(episodes)
        for episode in episodes:
            job = episode.job
            if job.mode == "policy":
                episode.actions = np.concatenate([r.actions for r in episode.chunks]).astype(np.float32)
            elif job.mode == "forward_dynamics":
                episode.actions = model_actions(job, self.normalizer)
            elif job.mode == "inverse_dynamics":
                episode.actions = episode.chunks[0].actions.astype(np.float32)
        self._label(episodes)
        start = time.perf_counter()
        self._read_back(episodes)
        self._rerender(episodes)
        return episodes, time.perf_counter() - start

    def _run(self, samples: list[Sample], batch: PreparedBatch | None = None) -> list[GenerationResult]:
        results = self.pipeline.run_batch(batch if batch is not None else samples, progress=False)
        if len(results) != len(samples):
            raise RuntimeError(f"a batch of {len(samples)} samples returned {len(results)} results; sdg runs "
                               "each process on its own devices (a mesh over local devices only)")
        return results

    def _chain(self, episodes: list[_Episode]) -> None:
        for c in range(1, max(e.job.chunks for e in episodes)):
            todo = [e for e in episodes if e.job.chunks > c]
            samples = []
            for e in todo:
                job = e.job
                last = to_uint8(e.chunks[-1].video[-1])
                actions = None
                if job.mode == "forward_dynamics":
                    actions = model_actions(job, self.normalizer)[c * job.chunk: (c + 1) * job.chunk]
                samples.append(Sample(request_for(job, image=last, actions=actions, seed=job.seed + c),
                                      e.sample_index))
            for e, result in zip(todo, self._run(samples)):
                e.chunks.append(result)

    def _idm_request(self, job: Job, frames: np.ndarray, seed: int) -> GenerationRequest:
        return GenerationRequest(
            job.prompt, job.negative_prompt, video=list(frames), action_mode="inverse_dynamics", domain=job.domain,
            chunk=frames.shape[0] - 1, resolution_tier=job.resolution_tier, view_point=job.view_point, fps=job.fps,
            steps=job.steps, guidance=1.0, seed=seed, output_type="latent")

    def _label(self, episodes: list[_Episode]) -> None:
        todo = [e for e in episodes if e.job.idm_labelled and e.job.mode != "inverse_dynamics"]
        if not todo:
            return
        samples = [Sample(self._idm_request(e.job, e.frames, e.job.seed), e.sample_index) for e in todo]
        for e, result in zip(todo, self._run(samples)):
            e.actions = result.actions.astype(np.float32)

    def _read_back(self, episodes: list[_Episode]) -> None:
        todo = [e for e in episodes if e.job.mode in ("policy", "forward_dynamics")]
        if not todo:
            return
        recovered: dict[int, list[np.ndarray]] = {id(e): [] for e in todo}
        for c in range(max(e.job.chunks for e in todo)):
            part = [e for e in todo if e.job.chunks > c]
            samples = []
            for e in part:
                chunk = e.job.chunk
                frames = e.frames[c * chunk: (c + 1) * chunk + 1]
                samples.append(Sample(self._idm_request(e.job, frames, helper_seed(e.job.seed, "read_back", c)),
                                      e.sample_index))
            for e, result in zip(part, self._run(samples)):
                recovered[id(e)].append(result.actions)
        for e in todo:
            nmse, per_channel = consistency.action_nmse(np.concatenate(recovered[id(e)]), e.actions)
            e.scores = {"kind": "action_read_back", "action_nmse": nmse, "action_nmse_per_channel": per_channel,
                        "latent_mse": None, "consistency": consistency.score(nmse)}

    def _rerender(self, episodes: list[_Episode]) -> None:
        todo = [e for e in episodes if e.job.idm_labelled]
        if not todo:
            return
        samples = []
        for e in todo:
            job = e.job
            request = GenerationRequest(
                job.prompt, job.negative_prompt, image=e.frames[0], action_mode="forward_dynamics",
                domain=job.domain, actions=e.actions, chunk=e.actions.shape[0], resolution_tier=job.resolution_tier,
                view_point=job.view_point, fps=job.fps, steps=job.steps, guidance=1.0,
                seed=helper_seed(job.seed, "re_render"), output_type="latent")
            samples.append(Sample(request, e.sample_index))
        for e, result in zip(todo, self._run(samples)):
            mse = consistency.latent_mse(result.latents, e.chunks[0].latents)
            e.scores = {"kind": "latent_re_render", "action_nmse": None, "action_nmse_per_channel": None,
                        "latent_mse": mse, "consistency": consistency.score(mse)}

    def _critique(self, episode: _Episode) -> dict[str, Any]:
        """critic_score, critic_answer and critic_seconds of one episode ({} without --critic)."""
        if self.critic is None:
            return {}
        start = time.perf_counter()
        result = critique(self.critic, episode.frames, episode.job.fps)
        return {"critic_score": result.score, "critic_answer": result.answer,
                "critic_seconds": time.perf_counter() - start}

    # ------------------------------------------------------------------------------------------ records

    def candidate(self, episode: _Episode, seconds: float, consistency_seconds: float,
                  critic: dict[str, Any] | None = None) -> Candidate:
        """The journal entry of one episode; `seconds` its share of its batch's time, of which
        `consistency_seconds` went to the consistency passes, plus its critic time; `critic` the `_critique`
        fields."""
        critic = critic or {}
        job = episode.job
        record = {
            "job_index": episode.job_index, "job_id": job.id, "sample_index": episode.sample_index,
            "slot": episode.sample_index // self.settings.best_of, "seed": job.seed, "mode": job.mode,
            "chunks": job.chunks, "model_fingerprint": self.model_fingerprint, "cosmos_jax_version": self.version,
            **episode_model_options(self.model_options),
            "consistency": episode.scores.get("consistency"), "consistency_kind": episode.scores.get("kind"),
            "action_nmse": episode.scores.get("action_nmse"),
            "action_nmse_per_channel": episode.scores.get("action_nmse_per_channel"),
            "latent_mse": episode.scores.get("latent_mse"),
            "seconds": seconds + critic.get("critic_seconds", 0.0), "consistency_seconds": consistency_seconds,
            **critic,
        }
        return Candidate(episode.job_index, episode.sample_index, episode.frames, episode.actions, record)


class Tally:
    """Kept/rejected counts of the slots whose candidates are all known (for the progress bar)."""

    def __init__(self, jobs: Sequence[Job], settings: Settings) -> None:
        self.settings = settings
        self.scores: dict[tuple[int, int], dict[int, float | None]] = {}
        self.sizes = {(j, slot): settings.best_of for j, job in enumerate(jobs) for slot in range(job.samples)}
        self.kept = self.rejected = 0

    def add(self, record: dict[str, Any]) -> None:
        slot = (record["job_index"], record["slot"])
        self.scores.setdefault(slot, {})[record["sample_index"]] = record["consistency"]
        if len(self.scores[slot]) == self.sizes.get(slot, 0):
            choice = choose(sorted(self.scores[slot].items()), self.settings.min_consistency)
            self.kept += choice.kept is not None
            self.rejected += len(choice.rejected)


def process_info() -> tuple[int, int]:
    """(this process's index, the number of processes) under jax.distributed (0, 1 otherwise)."""
    return jax.process_index(), jax.process_count()


def wait_for_merge(out: Path, poll_s: float = 0.5) -> None:
    """Block until process 0 has merged the dataset at `out` (the other processes, so that every process
    reaches jax.distributed's shutdown barrier together)."""
    while not (out / META_DIR / RUN_FILE).is_file():
        time.sleep(poll_s)


def wait_for_shards(journal: Journal, count: int, poll_s: float = 0.5, timeout_s: float | None = None) -> None:
    """Block until every one of `count` shards has finished (process 0, before the merge)."""
    start = time.monotonic()
    said = False
    while True:
        missing = sorted(set(range(count)) - journal.finished_shards())
        if not missing:
            return
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"shards {missing} of {journal.root} did not finish; re-run the command (it "
                               "resumes) or `cosmos-jax sdg --merge` once they have")
        if not said:
            print(f"waiting for the shards of processes {missing} to finish", file=sys.stderr)
            said = True
        time.sleep(poll_s)


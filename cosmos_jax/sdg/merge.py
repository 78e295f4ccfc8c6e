"""Merge the shards of an sdg run into one LeRobot v3.0 dataset (at the end of a run, or `sdg --merge`).

Episodes are written in (job order, slot) order, one per slot whose chosen candidate was kept
(`cosmos_jax.sdg.selection`), with the LeRobot writer: the video under the job's camera key, the task the
prompt, `action` in raw units when the run had the domain's normalisation stats (model space otherwise; said
in the feature's `info`). An episode of F frames has F − 1 actions (action t takes frame t to t + 1); its
last row is zeros for delta actions and repeats the last action otherwise, as `info.last_row` says. Each
episodes row gets `cosmos_sdg/...` columns (job id, sample index, seed, mode, chunks, model fingerprint,
cosmos-jax version, the model options quantize / lora / merge_lora, scores; with `--critic` also critic_score,
null when the answer was unparsable, and critic_answer, the raw answer). `meta/cosmos_sdg/` holds run.json,
episodes.jsonl (one line per
episode), report.json and report.png.

The dataset is assembled in the work folder and renamed to its place, so the output folder never holds a
half-merged dataset; the work folder is removed afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_jax.datasets.embodiments import embodiment
from cosmos_jax.datasets import normalization
from cosmos_jax.datasets.lerobot_writer import LeRobotWriter, video_feature
from cosmos_jax.datasets.normalization import ActionNormalizer, action_feature
from cosmos_jax.sdg.jobs import Job
from cosmos_jax.sdg.journal import META_DIR, RUN_FILE, Candidate, Journal, atomic_write_bytes, atomic_write_json
from cosmos_jax.sdg.report import build_report, write_report_png
from cosmos_jax.sdg.selection import choose, slot_samples

EPISODE_FIELDS = ("job_id", "sample_index", "seed", "mode", "chunks", "model_fingerprint", "cosmos_jax_version",
                  "quantize", "lora", "merge_lora", "consistency", "consistency_kind", "action_nmse",
                  "action_nmse_per_channel", "latent_mse")
CRITIC_FIELDS = ("critic_score", "critic_answer")
COLUMN_PREFIX = "cosmos_sdg/"


def episode_fields(run: dict[str, Any]) -> tuple[str, ...]:
    """The record fields each episode row and episodes.jsonl line carries (the critic's with --critic)."""
    return EPISODE_FIELDS + (CRITIC_FIELDS if run["settings"].get("critic") else ())


def normalizer_of_run(run: dict[str, Any]) -> ActionNormalizer | None:
    stats = run.get("action_stats")
    if stats is None:
        return None
    return ActionNormalizer(stats["domain"], stats["mode"], stats["kind"], stats["feature"],
                            {k: np.asarray(v, np.float64) for k, v in stats["stats"].items()})


def dataset_actions(actions: np.ndarray, domain: str, normalizer: ActionNormalizer | None) -> np.ndarray:
    """[F − 1, A] model-space actions -> the dataset's [F, A] float32 (raw units with a normaliser; the last
    row zeros for delta actions, the last action repeated otherwise)."""
    values = normalization.dataset_actions(actions, normalizer)
    kind = normalizer.kind if normalizer is not None else embodiment(domain).kind
    last = np.zeros_like(values[-1:]) if kind == "delta" else values[-1:]
    return np.concatenate([values, last])


def _features(job: Job, frames: np.ndarray, normalizer: ActionNormalizer | None) -> dict[str, Any]:
    features = {job.camera_key: video_feature(int(frames.shape[1]), int(frames.shape[2]))}
    if job.labelled:
        feature = action_feature(job.domain, normalizer)
        delta = feature["info"]["kind"] == "delta"
        feature["info"]["last_row"] = "zeros (delta actions)" if delta else "the last action repeated"
        features["action"] = feature
    return features


def select(journal: Journal, jobs: list[Job], run: dict[str, Any]) -> tuple[list[tuple[int, int]], list[dict]]:
    """(job index, sample index) of every kept episode in dataset order, and every candidate's record with
    its outcome ("kept", "best_of", "min_consistency")."""
    settings = run["settings"]
    kept, records = [], []
    for j, job in enumerate(jobs):
        for slot in range(job.samples):
            slot_records = {i: journal.read_record(j, i) for i in slot_samples(slot, settings["best_of"])}
            choice = choose([(i, r["consistency"]) for i, r in slot_records.items()], settings["min_consistency"])
            why = dict(choice.rejected)
            for index, record in slot_records.items():
                records.append({**record, "outcome": "kept" if index == choice.kept else why[index]})
            if choice.kept is not None:
                kept.append((j, choice.kept))
    return kept, records


def merge(out: str | os.PathLike, journal: Journal, *, wall_seconds: float | None = None) -> dict[str, Any]:
    """Write the dataset at `out` from the journal's shards; returns the report. FileNotFoundError naming the
    first candidate that was never generated."""
    out = Path(out)
    run = journal.run()
    jobs = [Job.from_json(j) for j in run["jobs"]]
    normalizer = normalizer_of_run(run)
    kept, records = select(journal, jobs, run)
    if not kept:
        raise ValueError(f"every candidate was rejected (--min-consistency {run['settings']['min_consistency']}); "
                         f"the candidates' scores are in {journal.root}")
    staging = journal.root / "merged"
    fields = episode_fields(run)
    episodes_meta, contact = [], []
    writer = None
    try:
        for number, (j, index) in enumerate(kept):
            candidate: Candidate = journal.read(j, index)
            job = jobs[j]
            if writer is None:
                writer = LeRobotWriter(staging, fps=int(job.fps), features=_features(job, candidate.frames,
                                                                                    normalizer),
                                       robot_type=job.domain, overwrite=True)
            columns = {}
            if job.labelled:
                columns["action"] = dataset_actions(candidate.actions, job.domain, normalizer)
            record = candidate.record
            writer.add_episode(task=job.prompt, columns=columns, frames={job.camera_key: candidate.frames},
                               episode_columns={COLUMN_PREFIX + k: record.get(k) for k in fields})
            episodes_meta.append({"episode_index": number, **{k: record.get(k) for k in fields},
                                  "prompt": job.prompt})
            if len(contact) < 6:
                contact.append((candidate.frames[0], candidate.frames[-1], f"ep {number} {job.id}"))
        writer.finalize()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    meta = staging / META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta / RUN_FILE, run)
    atomic_write_bytes(meta / "episodes.jsonl",
                       "".join(json.dumps(e, sort_keys=True) + "\n" for e in episodes_meta).encode())
    report = build_report(records, wall_seconds, run.get("model_options"),
                          critic=bool(run["settings"].get("critic")))
    atomic_write_json(meta / "report.json", report)
    write_report_png(meta / "report.png", records, contact)
    if out.exists():
        raise FileExistsError(f"{out} appeared while merging; the merged dataset is in {staging}")
    os.replace(staging, out)
    journal.remove()
    return report

"""`run_sdg`: one call from a jobs file to a finished dataset (validate, resume or refuse, generate, merge);
`warm_sdg`: the same run's programs compiled into the persistent compile cache, nothing generated or written."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cosmos_jax import aot
from cosmos_jax.datasets.normalization import STATS_FILE, normalizer_for_domain
from cosmos_jax.sdg.critic import Answerer, check_critic_model, pipeline_critic
from cosmos_jax.sdg.engine import (Engine, Settings, Tally, job_requests, process_info, wait_for_merge,
                                   wait_for_shards)
from cosmos_jax.sdg.fingerprint import NO_MODEL_OPTIONS, cosmos_jax_version, jobs_fingerprint, model_fingerprint
from cosmos_jax.sdg.jobs import JobError, JobErrors, read_jobs
from cosmos_jax.sdg.journal import META_DIR, RUN_FILE, RUN_FORMAT, Journal, check_same_run, finished_run, work_dir
from cosmos_jax.sdg.merge import merge


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _normalizer(model: Path, jobs: list, jobs_path: Path, errors: list[JobError]) -> tuple[Any, list]:
    """The model folder's action stats (None without a stats file), and the jobs whose domain fits them."""
    stats = model / STATS_FILE
    labelled = [job for job in jobs if job.labelled]
    if not stats.is_file() or not labelled:
        return None, jobs
    kept, normalizer = [], None
    for job in jobs:
        try:
            normalizer = normalizer_for_domain(stats, job.domain)
            kept.append(job)
        except ValueError as e:
            errors.append(JobError(jobs_path, job.line, "domain", str(e)))
    return normalizer, kept


def run_sdg(model: str | os.PathLike, jobs_path: str | os.PathLike, out: str | os.PathLike, settings: Settings,
            *, pipeline: Any = None, load: Callable[[], Any] | None = None,
            model_options: Mapping[str, Any] | None = None, skip_bad: bool = False, progress: bool = True,
            say: Callable[[str], None] = _say, critic: Answerer | None = None) -> dict[str, Any]:
    """Make (or finish) the dataset `out` from the jobs file; returns the report ({"nothing_to_do": True} when
    `out` is already the finished dataset of these jobs and this model; {"shard_done": p} on a process other
    than 0). The model: `pipeline`, or `load()` called once the run is known to need it, or else the folder
    loaded plainly in `settings.dtype`; `model_options` ({"quantize", "merge_lora", "lora": [{"path", "scale",
    "sha256"}]}, as `cosmos_jax.commands.model_options.ModelOptions.record` gives) say how it was loaded: they
    enter the model fingerprint and every episode's record. Raises JobErrors (every bad line) before any
    compute, ValueError when `out` or its work folder belongs to another run (other jobs, model, model options
    or settings: a resume that toggles --critic is refused).
    critic: with settings.critic, the function that answers the critic's question about a clip (None: the model
    folder's reasoner, `cosmos_jax.sdg.critic`)."""
    model, jobs_path, out = Path(model), Path(jobs_path), Path(out)
    model_options = dict(model_options or NO_MODEL_OPTIONS)
    _check_writer_dependencies()
    jobs, errors, normalizer = _checked_jobs(model, jobs_path, settings, skip_bad, critic)
    wanted = {"format": RUN_FORMAT, "jobs_fingerprint": jobs_fingerprint(jobs, settings.fingerprinted()),
              "model_fingerprint": model_fingerprint(model, model_options), "settings": settings.fingerprinted()}
    finished = finished_run(out)
    if finished is not None:
        check_same_run(finished, wanted, out / META_DIR / RUN_FILE)
        say(f"nothing to do: {out} is the finished dataset of these jobs and this model")
        Journal(work_dir(out)).remove()
        return {"nothing_to_do": True}
    Journal(work_dir(out)).check(wanted)
    process, count = process_info()
    start = time.perf_counter()
    pipeline, critic = _loaded(model, settings, pipeline, load, critic)
    jobs, requests = _model_checked(pipeline, jobs, errors, normalizer, jobs_path, skip_bad, say)
    run = {**wanted, "model": os.fspath(model.resolve()), "jobs": [j.to_json() for j in jobs],
           "model_options": model_options,
           "cosmos_jax_version": cosmos_jax_version(),
           "action_stats": normalizer.to_json() if normalizer is not None else None,
           "skipped_lines": [e.line for e in errors]}
    journal = Journal(work_dir(out), process)
    journal.start(run)
    engine = Engine(pipeline, jobs, requests, settings, normalizer, wanted["model_fingerprint"], model_options,
                    critic)
    done = journal.done()
    batches = engine.todo(done, process, count)
    tally = Tally(jobs, settings)
    for key in sorted(done):
        tally.add(journal.read_record(*key))
    total = sum(len(b.samples) for b in batches)
    if done:
        say(f"resuming: {len(done)} candidates already made, {total} to go on this process")
    bar = _bar(total, progress and process == 0)

    def advance(records: list[dict[str, Any]]) -> None:
        for record in records:
            tally.add(record)
        if bar is not None:
            bar.update(len(records))
            bar.set_postfix_str(f"kept {tally.kept}, rejected {tally.rejected}")

    try:
        engine.run(batches, journal, advance)
    finally:
        if bar is not None:
            bar.close()
    journal.finish_shard({"process": process})
    if process != 0:
        wait_for_merge(out)
        return {"shard_done": process}
    wait_for_shards(journal, count)
    report = merge(out, journal, wall_seconds=time.perf_counter() - start)
    say(f"{out}: {report['episodes']} episodes ({report['candidates']} candidates, rejected "
        f"{report['rejected']['best_of']} by --best-of and {report['rejected']['min_consistency']} by "
        f"--min-consistency); report in {out / META_DIR / 'report.json'}")
    return report


def warm_sdg(model: str | os.PathLike, jobs_path: str | os.PathLike, settings: Settings, *, pipeline: Any = None,
             load: Callable[[], Any] | None = None, skip_bad: bool = False, say: Callable[[str], None] = _say,
             critic: Answerer | None = None) -> aot.Warming:
    """Compile every program `run_sdg` with these arguments would run, writing them into the persistent compile
    cache (`cosmos_jax.compile_cache`, enabled by the caller), and run none: the jobs are checked and the model
    loaded as by `run_sdg`, every candidate is put in the same batches (`Engine.batches`), and each batch goes
    through every pass and the critic under `cosmos_jax.aot.compile_only()` (on zeros). Says one line per
    compiled program and the total; no dataset folder is read or written. Returns the record."""
    model, jobs_path = Path(model), Path(jobs_path)
    jobs, errors, normalizer = _checked_jobs(model, jobs_path, settings, skip_bad, critic)
    pipeline, critic = _loaded(model, settings, pipeline, load, critic)
    jobs, requests = _model_checked(pipeline, jobs, errors, normalizer, jobs_path, skip_bad, say)
    engine = Engine(pipeline, jobs, requests, settings, normalizer, model_fingerprint(model), critic=critic)
    start = time.perf_counter()
    with aot.compile_only(on_compiled=lambda c: say(c.line())) as warming:
        batches = engine.batches()
        for batch in batches:
            engine.warm(batch)
    say(f"warmed {len(batches)} batches: {warming.summary()}, {time.perf_counter() - start:.1f}s in all")
    return warming


def _checked_jobs(model: Path, jobs_path: Path, settings: Settings, skip_bad: bool,
                  critic: Answerer | None) -> tuple[list, list, Any]:
    """(jobs, errors, action normalizer) of the jobs file, checked without loading the model; raises JobErrors
    unless `skip_bad`."""
    if not model.is_dir():
        raise FileNotFoundError(f"--model folder not found: {model}")
    jobs, errors = read_jobs(jobs_path, skip_bad=skip_bad)
    normalizer, jobs = _normalizer(model, jobs, jobs_path, errors)
    if errors and not skip_bad:
        raise JobErrors(errors)
    if settings.min_consistency is not None and not jobs[0].labelled:
        raise ValueError("--min-consistency needs action-labelled jobs (give each job a domain)")
    if critic is not None and not settings.critic:
        raise ValueError("a critic was given to a run without settings.critic")
    if settings.critic and critic is None:
        check_critic_model(model)
    return jobs, errors, normalizer


def _loaded(model: Path, settings: Settings, pipeline: Any, load: Callable[[], Any] | None,
            critic: Answerer | None) -> tuple[Any, Answerer | None]:
    """(the pipeline: given, `load()`, or the folder loaded plainly; the critic: given, or with settings.critic
    the folder's reasoner sharing the pipeline's tower)."""
    if pipeline is None:
        pipeline = load() if load is not None else _plain_pipeline(model, settings.dtype)
    if settings.critic and critic is None:
        import jax.numpy as jnp

        critic = pipeline_critic(pipeline, model, getattr(jnp, settings.dtype))
    return pipeline, critic


def _model_checked(pipeline: Any, jobs: list, errors: list, normalizer: Any, jobs_path: Path, skip_bad: bool,
                   say: Callable[[str], None]) -> tuple[list, list]:
    """(jobs, first-chunk requests) the model accepts; `errors` gains the refused ones (raised unless
    `skip_bad`, then said as skipped)."""
    jobs, requests, model_errors = job_requests(pipeline, jobs, normalizer, jobs_path)
    errors += model_errors
    if model_errors and not skip_bad:
        raise JobErrors(model_errors)
    if not jobs:
        raise JobErrors(errors)
    for error in errors:
        say(f"skipped: {error}")
    return jobs, requests


def merge_only(out: str | os.PathLike, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """`sdg --merge DATASET`: merge the shards of a run that stopped before its merge."""
    out = Path(out)
    if finished_run(out) is not None:
        say(f"nothing to do: {out} is already merged")
        return {"nothing_to_do": True}
    journal = Journal(work_dir(out))
    journal.run()
    report = merge(out, journal)
    say(f"{out}: merged {report['episodes']} episodes")
    return report


def _plain_pipeline(model: Path, dtype: str) -> Any:
    import jax.numpy as jnp

    from cosmos_jax.sampling.generate import Cosmos3Pipeline

    return Cosmos3Pipeline.from_pretrained(model, dtype=getattr(jnp, dtype))


def _check_writer_dependencies() -> None:
    """The LeRobot writer's pyarrow and pandas, checked before any compute rather than at the merge."""
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("cosmos-jax sdg writes LeRobot datasets, which needs pyarrow and pandas: "
                          "pip install 'cosmos-jax[lerobot]'") from None


def _bar(total: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sdg", unit="sample", dynamic_ncols=True)

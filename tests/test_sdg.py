"""`cosmos-jax sdg` end to end on the embedded demo checkpoint (random weights, fp32, XLA attention).

What is pinned: the dataset layout and per-episode records; batch size 4 == batch size 1; an episode equals
`generate` run alone with its recorded seed and sample index (fp32, 1e-6); an interrupted run resumes to the
same dataset; a finished dataset is left alone; other jobs or another model are refused; --best-of and
--min-consistency; --merge after a stop. The subprocess tests (SIGKILL, --mesh data=4 on 4 fake CPU devices,
two jax.distributed processes) are marked slow.

"Identical datasets" across batch sizes and meshes: every file's structure, every record, task and index
are equal; float columns (actions, their stats, the scores) are equal within 1e-6 absolute, since XLA:CPU sums
a matmul over another number of rows in another order (a few ulp). A few ulp can move a pixel that sits on a
rounding boundary by one uint8 level, so camera stats agree within one level (1/255: no min, max, mean,
quantile or std of frames that differ by at most one level per value moves further), and the decoded videos
within 40 dB PSNR (the AV1 encoder spreads a one-level change over its block: on a 32x32 clip, 5 flipped
values change 17% of the decoded ones, mean 0.23 levels, max 6, PSNR about 50 dB; a wrong or shifted clip is
below 25 dB). Reruns of the same batch grouping (resume, two processes) are compared bitwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

FLOAT_ATOL = 1e-6
CAMERA_ATOL = 1 / 255 + 1e-12
MIN_VIDEO_PSNR_DB = 40.0
pytestmark = pytest.mark.slow  # one shared reference run: about 2.5 min on a loaded 2-core CPU
REPO = Path(__file__).resolve().parents[1]


def _jobs(folder: Path) -> Path:
    from cosmos_jax.demo import demo_image

    folder.mkdir(parents=True, exist_ok=True)
    demo_image(32, 32).save(folder / "frame.png")
    np.save(folder / "actions.npy", (np.random.default_rng(0).standard_normal((8, 10)) * 0.3).astype(np.float32))
    common = {"image": "frame.png", "domain": "bridge_orig_lerobot", "resolution_tier": 256, "steps": 2, "fps": 8}
    jobs = [
        {"id": "pol", "mode": "policy", "prompt": "pick", "chunk": 4, "seed": 0, "samples": 2, **common},
        {"id": "fd", "mode": "forward_dynamics", "prompt": "push", "actions": "actions.npy", "chunk": 4, "seed": 1,
         **common},
        {"id": "i2v", "mode": "image2video", "prompt": "scene", "num_frames": 5, "height": 32, "width": 32,
         "guidance": 1.0, "seed": 2, **common},
        {"id": "long", "mode": "policy", "prompt": "slide", "chunk": 4, "chunks": 2, "seed": 3, **common},
    ]
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import jax.numpy as jnp

    from cosmos_jax.demo import build_demo_checkpoint
    from cosmos_jax.sampling.generate import Cosmos3Pipeline

    root = tmp_path_factory.mktemp("sdg")
    checkpoint = build_demo_checkpoint(root / "checkpoint")
    pipeline = Cosmos3Pipeline.from_pretrained(checkpoint, dtype=jnp.float32, attention="xla")
    return {"root": root, "checkpoint": checkpoint, "pipeline": pipeline, "jobs": _jobs(root / "jobs")}


def _run(world, out: Path, jobs: Path | None = None, messages: list | None = None, **settings):
    from cosmos_jax.sdg.engine import Settings
    from cosmos_jax.sdg.run import run_sdg

    say = (messages.append if messages is not None else lambda m: None)
    return run_sdg(world["checkpoint"], jobs or world["jobs"], out, Settings(**settings), pipeline=world["pipeline"],
                   progress=False, say=say)


@pytest.fixture(scope="module")
def reference(world):
    out = world["root"] / "reference"
    _run(world, out, batch_size=1)
    return out


def contents(root: Path) -> dict:
    """Every parquet as columns, every mp4 decoded, every JSON file except report.json (it holds times)."""
    import pyarrow.parquet as pq

    from cosmos_jax.datasets.video import decode_all

    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".parquet":
            out[rel] = pq.read_table(path).to_pydict()
        elif path.suffix == ".mp4":
            out[rel] = decode_all(path)
        elif path.suffix in (".json", ".jsonl") and path.name != "report.json":
            out[rel] = path.read_text()
    return out


def assert_same_dataset(a: Path, b: Path, exact: bool) -> None:
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        x, y = ca[key], cb[key]
        if isinstance(x, np.ndarray):
            if exact:
                np.testing.assert_array_equal(x, y, err_msg=key)
            else:
                assert x.shape == y.shape, key
                assert video_psnr(x, y) >= MIN_VIDEO_PSNR_DB, f"{key}: PSNR {video_psnr(x, y):.1f} dB"
        elif isinstance(x, str):
            if exact or key.endswith("run.json"):
                assert x == y, key
            else:
                _same_json(json.loads(x) if key.endswith(".json") else [json.loads(l) for l in x.splitlines()],
                           json.loads(y) if key.endswith(".json") else [json.loads(l) for l in y.splitlines()], key)
        else:
            assert list(x) == list(y), key
            for column in x:
                if x[column] == y[column]:
                    continue
                assert not exact, f"{key} {column} differs"
                _same_json(x[column], y[column], f"{key} {column}")


def video_psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR in dB of two uint8 videos (inf when equal)."""
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _same_json(x, y, where: str) -> None:
    if isinstance(x, float) or isinstance(y, float):
        atol = CAMERA_ATOL if "observation.images." in where else FLOAT_ATOL
        assert x == pytest.approx(y, abs=atol), where
    elif isinstance(x, dict):
        assert sorted(x) == sorted(y), where
        for k in x:
            _same_json(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), where
        for i, (p, q) in enumerate(zip(x, y)):
            _same_json(p, q, f"{where}[{i}]")
    else:
        assert x == y, where


def test_the_dataset_is_lerobot_v3_in_job_order_with_records(world, reference):
    import pyarrow.parquet as pq

    from cosmos_jax.datasets.lerobot_reader import open_lerobot

    dataset = open_lerobot(reference)
    episodes = dataset.episodes
    assert [e.length for e in episodes] == [5, 5, 5, 5, 9]  # chunk + 1 frames; the long episode 2·chunk + 1
    info = json.loads((reference / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 8 and info["total_episodes"] == 5
    assert info["features"]["action"]["info"]["space"] == "model"
    assert info["features"]["observation.images.ego_view"]["shape"] == [32, 32, 3]
    rows = pq.read_table(reference / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    assert rows["cosmos_sdg/job_id"] == ["pol", "pol", "fd", "i2v", "long"]
    assert rows["cosmos_sdg/sample_index"] == [0, 1, 0, 0, 0] and rows["cosmos_sdg/seed"] == [0, 0, 1, 2, 3]
    assert rows["cosmos_sdg/mode"] == ["policy", "policy", "forward_dynamics", "image2video", "policy"]
    assert rows["cosmos_sdg/consistency_kind"] == ["action_read_back"] * 3 + ["latent_re_render",
                                                                             "action_read_back"]
    assert all(0 < s <= 1 for s in rows["cosmos_sdg/consistency"])
    assert all(len(c) == 10 for i, c in enumerate(rows["cosmos_sdg/action_nmse_per_channel"]) if i != 3)
    assert rows["cosmos_sdg/latent_mse"][3] > 0 and rows["cosmos_sdg/action_nmse"][3] is None
    assert len(set(rows["cosmos_sdg/model_fingerprint"])) == 1
    lines = [json.loads(l) for l in (reference / "meta/cosmos_sdg/episodes.jsonl").read_text().splitlines()]
    assert [l["episode_index"] for l in lines] == list(range(5))
    assert [l["consistency"] for l in lines] == rows["cosmos_sdg/consistency"]
    report = json.loads((reference / "meta/cosmos_sdg/report.json").read_text())
    assert (report["candidates"], report["episodes"], report["rejected"]) == (
        5, 5, {"best_of": 0, "min_consistency": 0})
    assert report["consistency"]["kept"]["count"] == 5
    assert (reference / "meta/cosmos_sdg/report.png").stat().st_size > 1000
    assert sorted(dataset.tasks.values()) == ["pick", "push", "scene", "slide"]
    fd = dataset.episode_columns(episodes[2], ["action"])["action"]
    np.testing.assert_array_equal(fd[:4], np.load(world["jobs"].parent / "actions.npy")[:4])
    np.testing.assert_array_equal(fd[4], 0.0)  # bridge actions are deltas: the last frame's row is zeros
    assert not (reference.parent / "reference.sdg-work").exists()


def test_batch_size_four_gives_the_same_dataset(world, reference):
    out = world["root"] / "batch4"
    _run(world, out, batch_size=4)
    assert_same_dataset(reference, out, exact=False)
    video = next(v for k, v in sorted(contents(reference).items()) if k.endswith(".mp4"))
    others = [video_psnr(video[:5], video[5 * i:5 * i + 5]) for i in range(1, 5)]
    assert max(others) < 25.0, others  # another episode's clip is far below the bound (15.8 ... 21.2 dB)


def test_an_episode_is_what_generate_makes_alone_with_its_seed(world, reference):
    from cosmos_jax.datasets.lerobot_reader import open_lerobot
    from cosmos_jax.datasets.video import VideoEncoding, decode_all, encode_mp4
    from cosmos_jax.sampling.media import to_uint8
    from cosmos_jax.sdg.jobs import read_jobs, request_for

    dataset = open_lerobot(reference)
    episodes = dataset.episodes
    jobs, _ = read_jobs(world["jobs"])
    for number, job, index in ((1, jobs[0], 1), (2, jobs[1], 0)):
        results = list(world["pipeline"].generate_samples([request_for(job)], num_samples=index + 1,
                                                          progress=False))
        last = results[-1]
        assert (last.seed, last.sample_index) == (job.seed, index)
        actions = dataset.episode_columns(episodes[number], ["action"])["action"][:-1]
        want = last.actions if job.mode == "policy" else np.load(job.actions)[:4]
        np.testing.assert_allclose(actions, want, atol=1e-6, rtol=0)
        encode_mp4(world["root"] / "alone.mp4", to_uint8(last.video), 8, VideoEncoding())
        frames = dataset.read_frames(episodes[number], "observation.images.ego_view", episodes[number].length)
        np.testing.assert_array_equal(frames, decode_all(world["root"] / "alone.mp4"))


def test_a_rerun_over_the_finished_dataset_does_nothing_and_says_so(world, reference):
    before = contents(reference)
    messages: list[str] = []
    assert _run(world, reference, messages=messages, batch_size=1) == {"nothing_to_do": True}
    assert any("nothing to do" in m for m in messages)
    assert contents(reference).keys() == before.keys()
    assert not (reference.parent / "reference.sdg-work").exists()


def test_other_jobs_or_another_model_are_refused(world, reference, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    for name in ("frame.png", "actions.npy"):
        shutil.copy(world["jobs"].parent / name, tmp_path / name)
    lines = world["jobs"].read_text().splitlines()
    jobs.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="made from other jobs"):
        _run(world, reference, jobs=jobs, batch_size=1)
    with pytest.raises(ValueError, match="made from other jobs"):
        _run(world, reference, best_of=2)
    model = tmp_path / "model"
    shutil.copytree(world["checkpoint"], model)
    (model / "model_index.json").write_text((model / "model_index.json").read_text().replace("true", "false", 1))
    from cosmos_jax.sdg.engine import Settings
    from cosmos_jax.sdg.run import run_sdg

    with pytest.raises(ValueError, match="made from other model"):
        run_sdg(model, world["jobs"], reference, Settings(), pipeline=world["pipeline"], progress=False,
                say=lambda m: None)


def test_an_interrupted_run_resumes_to_the_same_dataset(world, reference, monkeypatch):
    from cosmos_jax.sdg import journal as journal_lib

    out = world["root"] / "interrupted"
    write = journal_lib.Journal.write
    calls = {"n": 0}

    def dying_write(self, candidate):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        write(self, candidate)

    monkeypatch.setattr(journal_lib.Journal, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(world, out, batch_size=1)
    work = out.with_name(out.name + ".sdg-work")
    assert not out.exists() and len(list(work.glob("shard-*/c*.npz"))) == 2
    monkeypatch.setattr(journal_lib.Journal, "write", write)
    messages: list[str] = []
    made = []
    monkeypatch.setattr(journal_lib.Journal, "write", lambda self, c: (made.append(c.record["job_id"]),
                                                                        write(self, c)))
    _run(world, out, messages=messages, batch_size=1)
    assert any("resuming: 2 candidates already made" in m for m in messages)
    assert sorted(made) == ["fd", "i2v", "long"]  # no finished sample is made again
    assert_same_dataset(reference, out, exact=True)


def test_best_of_and_min_consistency_keep_the_best_and_count_the_rejected(world, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    for name in ("frame.png", "actions.npy"):
        shutil.copy(world["jobs"].parent / name, tmp_path / name)
    jobs.write_text(world["jobs"].read_text().splitlines()[0] + "\n")
    out = tmp_path / "best"
    report = _run(world, out, jobs=jobs, best_of=3, min_consistency=0.0, batch_size=2)
    assert (report["candidates"], report["episodes"], report["rejected"]["best_of"]) == (6, 2, 4)
    lines = [json.loads(l) for l in (out / "meta/cosmos_sdg/episodes.jsonl").read_text().splitlines()]
    rejected = report["rejected_candidates"]
    for slot, line in enumerate(lines):
        assert line["sample_index"] // 3 == slot
        others = [r["consistency"] for r in rejected if r["sample_index"] // 3 == slot]
        assert len(others) == 2 and all(line["consistency"] >= s for s in others)
    strict = tmp_path / "strict"
    with pytest.raises(ValueError, match="every candidate was rejected"):
        _run(world, strict, jobs=jobs, best_of=3, min_consistency=1.0, batch_size=2)


def test_merge_finishes_a_run_stopped_before_its_merge(world, reference, monkeypatch):
    from cosmos_jax.sdg import run as run_lib

    out = world["root"] / "unmerged"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_lib, "merge", stop)
    with pytest.raises(KeyboardInterrupt):
        _run(world, out, batch_size=1)
    monkeypatch.undo()
    assert not out.exists()
    run_lib.merge_only(out, say=lambda m: None)
    assert_same_dataset(reference, out, exact=True)


# ------------------------------------------------------------------------------------ subprocess (slow)


def _cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "cosmos_jax.cli", "sdg", *args], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _common(world, out: Path) -> list[str]:
    return ["--model", str(world["checkpoint"]), "--jobs", str(world["jobs"]), "--out", str(out), "--dtype",
            "float32", "--attention", "xla", "--no-progress"]


@pytest.mark.slow
def test_sigkill_at_several_points_then_rerun_equals_an_uninterrupted_run(world, reference):
    out = world["root"] / "killed"
    work = out.with_name(out.name + ".sdg-work")
    for kill_after in (1, 3):
        proc = _cli(_common(world, out) + ["--batch-size", "1"])
        deadline = time.monotonic() + 600
        while len(list(work.glob("shard-*/c*.npz"))) < kill_after:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists()
    proc = _cli(_common(world, out) + ["--batch-size", "1"])
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    assert "resuming: " in text
    assert_same_dataset(reference, out, exact=True)


@pytest.mark.slow
def test_four_fake_devices_with_a_data_axis_give_the_same_dataset(world, reference):
    out = world["root"] / "mesh4"
    proc = _cli(_common(world, out) + ["--mesh", "data=4", "--batch-size", "4"],
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    text, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, text
    assert_same_dataset(reference, out, exact=False)


@pytest.mark.slow
def test_two_jax_distributed_processes_equal_one(world, reference):
    out = world["root"] / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_cli(_common(world, out) + ["--batch-size", "1", "--distributed", "--coordinator",
                                         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)])
             for i in range(2)]
    texts = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], texts
    assert_same_dataset(reference, out, exact=True)


def test_with_the_models_action_stats_the_dataset_holds_raw_units(world, tmp_path):
    from cosmos_jax.datasets.lerobot_reader import open_lerobot
    from cosmos_jax.datasets.normalization import STATS_FILE, normalizer_from_stats, write_normalizer
    from cosmos_jax.sdg.engine import Settings
    from cosmos_jax.sdg.run import run_sdg

    model = tmp_path / "model"
    shutil.copytree(world["checkpoint"], model)
    stats = {"q01": np.full(10, -2.0), "q99": np.full(10, 4.0), "mean": np.ones(10), "std": np.full(10, 3.0)}
    write_normalizer(model / STATS_FILE, normalizer_from_stats("bridge_orig_lerobot", stats))
    for name in ("frame.png", "actions.npy"):
        shutil.copy(world["jobs"].parent / name, tmp_path / name)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(world["jobs"].read_text().splitlines()[1] + "\n")
    out = tmp_path / "raw"
    run_sdg(model, jobs, out, Settings(), pipeline=world["pipeline"], progress=False, say=lambda m: None)
    dataset = open_lerobot(out)
    assert dataset.features["action"]["info"]["space"] == "raw"
    actions = dataset.episode_columns(dataset.episodes[0], ["action"])["action"]
    np.testing.assert_allclose(actions[:4], np.load(tmp_path / "actions.npy")[:4], atol=1e-6, rtol=0)

"""LeRobot v3.0 writer and readers, the embodiment registry and action normalisation.

Datasets are synthetic (tmp_path). The round trip writes 2 cameras (32x48 and 32x32, libx264 yuv420p crf 30,
smooth drifting gradients), 3 episodes of 23, 37 and 14 frames, 2-D actions and 3-D state, with file-size
limits (4 KB data, 6 KB video) small enough that the data parquet and both cameras' mp4s roll over to a second
file. Actions and state come back bit-exact; frames within codec loss: measured PSNR 34.1-35.6 dB per episode
and camera (the AV1 default on 64x64: 41 dB), asserted >= 30 dB. The v3.0 fixture is built column by column
from lerobot 0.6.1's layout with pandas and pyarrow, without our writer; the v2.1 fixture likewise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmos_jax.datasets import lerobot_layout as layout
from cosmos_jax.datasets.embodiments import EMBODIMENTS, embodiment
from cosmos_jax.datasets.lerobot_reader import open_lerobot
from cosmos_jax.datasets.lerobot_v3 import LeRobotV3
from cosmos_jax.datasets.lerobot_writer import LeRobotWriter, vector_feature, video_feature
from cosmos_jax.datasets.normalization import (
    ActionNormalizer,
    normalizer_from_stats,
    read_normalizer,
    write_normalizer,
)
from cosmos_jax.datasets.video import Mp4Appender, VideoEncoding, decode_all, encode_mp4
from cosmos_jax.sampling.prompts import EMBODIMENT_DOMAINS, RAW_ACTION_DIM

FPS = 10
CAMERAS = {"observation.images.top": (32, 48), "observation.images.wrist": (32, 32)}
LENGTHS = (23, 37, 14)
TASKS = ("push the disc", "open the drawer", "push the disc")
H264 = VideoEncoding(codec="libx264")


def smooth_frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """[count, height, width, 3] uint8: gradients drifting over time (compressible, like camera images)."""
    t = np.arange(count)[:, None, None] / max(count, 1)
    y = np.linspace(0, 1, height)[None, :, None]
    x = np.linspace(0, 1, width)[None, None, :]
    phase = seed * 0.7
    channels = [np.sin(np.pi * (x + 0.3 * t + phase)), np.cos(np.pi * (y - 0.3 * t)), np.sin(np.pi * (x + y) / 2 + t)]
    return np.round((np.stack(np.broadcast_arrays(*channels), -1) * 0.4 + 0.5) * 255).astype(np.uint8)


def episode_data(index: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10 + index)
    return {"action": rng.normal(size=(length, 2)).astype(np.float32),
            "observation.state": rng.normal(size=(length, 3)).astype(np.float32),
            **{key: smooth_frames(length, h, w, index + k) for k, (key, (h, w)) in enumerate(CAMERAS.items())}}


FEATURES = {"action": vector_feature(["x", "y"]), "observation.state": vector_feature(["a", "b", "c"]),
            **{key: video_feature(h, w) for key, (h, w) in CAMERAS.items()}}


def write_dataset(root: Path, encoding: VideoEncoding = H264, **limits) -> Path:
    limits = {"data_files_size_in_mb": 0.004, "video_files_size_in_mb": 0.006} | limits
    with LeRobotWriter(root, fps=FPS, features=FEATURES, robot_type="test_arm", encoding=encoding,
                       **limits) as writer:
        for index, length in enumerate(LENGTHS):
            data = episode_data(index, length)
            writer.add_episode(task=TASKS[index], columns={k: data[k] for k in ("action", "observation.state")},
                               frames={k: data[k] for k in CAMERAS}, episode_columns={"seed": 10 + index})
    return root


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("v3") / "dataset")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_round_trip_rolls_over_and_reads_back(written):
    root = written
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # temporary folder renamed away
    info = json.loads((root / "meta/info.json").read_text())
    assert list(info) == ["codebase_version", "fps", "features", "total_episodes", "total_frames", "total_tasks",
                          "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "data_path",
                          "video_path", "robot_type", "splits"]
    assert (info["codebase_version"], info["fps"], info["total_episodes"], info["total_frames"],
            info["total_tasks"]) == ("v3.0", FPS, 3, sum(LENGTHS), 2)
    assert info["splits"] == {"train": "0:3"} and info["data_path"] == layout.DATA_PATH
    assert list(info["features"]) == [*FEATURES, *layout.FRAME_FEATURES]
    top = info["features"]["observation.images.top"]
    assert top["shape"] == [32, 48, 3] and top["info"]["video.codec"] == "h264"
    assert top["info"]["video.pix_fmt"] == "yuv420p" and top["info"]["video.fps"] == FPS
    assert (root / "data/chunk-000/file-001.parquet").is_file()
    for key in CAMERAS:
        assert (root / f"videos/{key}/chunk-000/file-001.mp4").is_file(), key

    dataset = open_lerobot(root)
    assert isinstance(dataset, LeRobotV3) and dataset.problems == []
    assert [(e.index, e.length, e.tasks) for e in dataset.episodes] == [
        (i, n, (TASKS[i],)) for i, n in enumerate(LENGTHS)]
    assert dataset.tasks == {0: "push the disc", 1: "open the drawer"}
    files = {(e["data/file_index"], e[f"videos/{k}/file_index"]) for e in dataset.rows.values() for k in CAMERAS}
    assert len({f for f, _ in files}) == 2 and len({v for _, v in files}) >= 2
    stats_rows = pd.concat([pd.read_parquet(p) for p in sorted((root / "meta/episodes").glob("*/*.parquet"))])
    worst = np.inf
    start = 0
    for episode in dataset.episodes:
        want = episode_data(episode.index, episode.length)
        got = dataset.episode_columns(episode, ["action", "observation.state", "timestamp", "frame_index", "index",
                                                "task_index"])
        np.testing.assert_array_equal(got["action"], want["action"])
        np.testing.assert_array_equal(got["observation.state"], want["observation.state"])
        np.testing.assert_array_equal(got["timestamp"], (np.arange(episode.length) / FPS).astype(np.float32))
        np.testing.assert_array_equal(got["index"], np.arange(start, start + episode.length))
        assert got["task_index"].tolist() == [0 if episode.index != 1 else 1] * episode.length
        row, stats_row = dataset.rows[episode.index], stats_rows.iloc[episode.index]
        assert (row["dataset_from_index"], row["dataset_to_index"]) == (start, start + episode.length)
        for key in CAMERAS:
            span = row[f"videos/{key}/to_timestamp"] - row[f"videos/{key}/from_timestamp"]
            assert span == pytest.approx(episode.length / FPS, abs=1e-9)
            frames = dataset.episode_frames(episode, key)
            assert frames.shape == want[key].shape
            worst = min(worst, psnr(frames, want[key]))
        for name, stat in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std)):
            np.testing.assert_array_equal(stats_row[f"stats/action/{name}"],
                                          stat(want["action"].astype(np.float64), 0))
        np.testing.assert_array_equal(stats_row["stats/action/q01"],
                                      np.quantile(want["action"].astype(np.float64), 0.01, axis=0))
        assert stats_row["stats/action/count"].tolist() == [episode.length] and row["seed"] == 10 + episode.index
        camera_mean = want["observation.images.top"].reshape(-1, 3).astype(np.float64).mean(0) / 255
        top_mean = np.stack([np.stack(c) for c in stats_row["stats/observation.images.top/mean"]])
        np.testing.assert_allclose(top_mean.reshape(3), camera_mean, rtol=1e-12)
        start += episode.length
    assert worst >= 30.0, worst

    stats = json.loads((root / "meta/stats.json").read_text())
    everything = np.concatenate([episode_data(i, n)["observation.state"] for i, n in enumerate(LENGTHS)])
    np.testing.assert_array_equal(stats["observation.state"]["mean"], everything.astype(np.float64).mean(0))
    np.testing.assert_array_equal(stats["observation.state"]["q99"],
                                  np.quantile(everything.astype(np.float64), 0.99, axis=0))
    assert stats["observation.state"]["count"] == [sum(LENGTHS)]
    assert np.asarray(stats["observation.images.wrist"]["mean"]).shape == (3, 1, 1)
    assert stats["frame_index"]["max"] == [max(LENGTHS) - 1]


def test_layout_details_lerobot_depends_on(written):
    tasks = pd.read_parquet(written / "meta/tasks.parquet")  # lerobot reads it with pandas: strings are the index
    assert tasks.index.name == "task" and tasks.index.tolist() == ["push the disc", "open the drawer"]
    assert tasks["task_index"].tolist() == [0, 1]
    rows = pd.concat([pd.read_parquet(p) for p in sorted((written / "meta/episodes").glob("*/*.parquet"))])
    assert rows["episode_index"].tolist() == [0, 1, 2]  # lerobot finds episode e at row e
    assert list(rows.columns[:7]) == layout.episode_columns([])
    assert rows.columns[-2:].tolist() == ["meta/episodes/chunk_index", "meta/episodes/file_index"]
    for path in (written / "data").glob("*/*.parquet"):
        schema = pq.read_schema(path)
        assert schema.names == ["action", "observation.state", *layout.FRAME_FEATURES]  # nothing undeclared
        assert schema.field("action").type == pa.list_(pa.float32(), 2)


def test_av1_default_encoding(tmp_path):
    root = tmp_path / "av1"
    with LeRobotWriter(root, fps=FPS, features={"cam": video_feature(64, 64), "action": vector_feature(["x"])},
                       encoding=VideoEncoding()) as writer:
        frames = smooth_frames(9, 64, 64, 0)
        writer.add_episode(task="t", columns={"action": np.zeros(9, np.float32)}, frames={"cam": frames})
    info = json.loads((root / "meta/info.json").read_text())["features"]["cam"]["info"]
    assert info["video.codec"] == "av1" and info["video.preset"] == 12 and info["video.g"] == 2
    dataset = open_lerobot(root)
    assert psnr(dataset.episode_frames(dataset.episodes[0], "cam"), frames) >= 30.0


def test_writer_rejects_bad_episodes_and_leaves_nothing(tmp_path):
    root = tmp_path / "bad"
    features = {"action": vector_feature(["x", "y"])}
    with pytest.raises(ValueError, match="undeclared \\['effort'\\]"):
        with LeRobotWriter(root, fps=FPS, features=features) as writer:
            writer.add_episode(task="t", columns={"action": np.zeros((3, 2)), "effort": np.zeros((3, 1))})
    assert list(tmp_path.iterdir()) == []
    writer = LeRobotWriter(root, fps=FPS, features=features)
    with pytest.raises(ValueError, match="'action' must be \\[N, 2\\], got \\[3, 3\\]"):
        writer.add_episode(task="t", columns={"action": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="not finite in rows \\[1\\]"):
        writer.add_episode(task="t", columns={"action": np.array([[0, 0], [np.nan, 0]])})
    writer.abort()
    with pytest.raises(ValueError, match="fps must be a positive int"):
        LeRobotWriter(root, fps=0, features=features)
    with pytest.raises(ValueError, match="shape \\[height, width, 3\\]"):
        LeRobotWriter(root, fps=FPS, features={"cam": {"dtype": "video", "shape": [4, 4], "names": None}})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- fixtures by hand


def _numpy_stats(values: np.ndarray, image: bool = False) -> dict[str, list]:
    """lerobot's stats keys for one episode's column, computed with numpy (cameras: per channel in [0, 1])."""
    rows = values.reshape(-1, 3).astype(np.float64) / 255 if image else values.reshape(len(values), -1)
    stats = {"min": rows.min(0), "max": rows.max(0), "mean": rows.mean(0), "std": rows.std(0)}
    stats |= {f"q{round(q * 100):02d}": np.quantile(rows, q, 0) for q in (0.01, 0.10, 0.50, 0.90, 0.99)}
    out = {k: (v.reshape(3, 1, 1) if image else v).tolist() for k, v in stats.items()}
    return {**{k: out[k] for k in ("min", "max", "mean", "std")}, "count": [len(values)],
            **{k: v for k, v in out.items() if k.startswith("q")}}


def _lerobot_fixture(root: Path) -> dict[int, dict[str, np.ndarray]]:
    """Two episodes (5 and 8 frames) in one data file and one mp4 per camera, as lerobot 0.6.1 writes them."""
    lengths, fps = (5, 8), 15
    episodes = {i: {"action": np.random.default_rng(i).normal(size=(n, 2)).astype(np.float32),
                    "cam": smooth_frames(n, 32, 32, i)} for i, n in enumerate(lengths)}
    features = {"action": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
                "cam": {"dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channels"],
                        "info": {"video.height": 32, "video.width": 32, "video.codec": "h264",
                                 "video.pix_fmt": "yuv420p", "video.fps": fps, "video.channels": 3,
                                 "has_audio": False, "is_depth_map": False}},
                **layout.FRAME_FEATURES}
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    (root / "data/chunk-000").mkdir(parents=True)
    info = {"codebase_version": "v3.0", "fps": fps, "features": features, "total_episodes": 2, "total_frames": 13,
            "total_tasks": 1, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "robot_type": "so100", "splits": {"train": "0:2"}}
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    pd.DataFrame({"task_index": [0]}, index=pd.Index(["stack the cubes"], name="task")).to_parquet(
        root / "meta/tasks.parquet")
    actions = np.concatenate([episodes[i]["action"] for i in episodes])
    frame_index = np.concatenate([np.arange(n) for n in lengths])
    pq.write_table(pa.table({
        "action": pa.FixedSizeListArray.from_arrays(pa.array(actions.reshape(-1)), 2),
        "timestamp": pa.array((frame_index / fps).astype(np.float32)),
        "frame_index": pa.array(frame_index), "episode_index": pa.array(np.repeat([0, 1], lengths)),
        "index": pa.array(np.arange(13)), "task_index": pa.array(np.zeros(13, np.int64))}),
        root / "data/chunk-000/file-000.parquet")
    video = root / "videos/cam/chunk-000/file-000.mp4"
    appender = Mp4Appender(video, fps)
    spans = []
    for i in episodes:
        encode_mp4(root / f"ep{i}.mp4", episodes[i]["cam"], fps, H264)
        spans.append(appender.append(root / f"ep{i}.mp4", lengths[i]))
        (root / f"ep{i}.mp4").unlink()
    appender.close()
    columns = {
        "episode_index": [0, 1], "tasks": [["stack the cubes"]] * 2, "length": list(lengths),
        "data/chunk_index": [0, 0], "data/file_index": [0, 0], "dataset_from_index": [0, 5],
        "dataset_to_index": [5, 13], "videos/cam/chunk_index": [0, 0], "videos/cam/file_index": [0, 0],
        "videos/cam/from_timestamp": [s for s, _ in spans], "videos/cam/to_timestamp": [e for _, e in spans]}
    per_episode = {
        i: {"action": _numpy_stats(episodes[i]["action"]), "cam": _numpy_stats(episodes[i]["cam"], image=True),
            "timestamp": _numpy_stats(np.arange(n) / fps), "frame_index": _numpy_stats(np.arange(n)),
            "episode_index": _numpy_stats(np.full(n, i)), "index": _numpy_stats(np.arange(n) + 5 * i),
            "task_index": _numpy_stats(np.zeros(n))} for i, n in enumerate(lengths)}
    for key in per_episode[0]:
        for name in per_episode[0][key]:
            columns[f"stats/{key}/{name}"] = [per_episode[i][key][name] for i in episodes]
    columns |= {"meta/episodes/chunk_index": [0, 0], "meta/episodes/file_index": [0, 0]}
    pq.write_table(pa.Table.from_pydict(columns), root / "meta/episodes/chunk-000/file-000.parquet")
    (root / "meta/stats.json").write_text(json.dumps({"action": _numpy_stats(actions)}, indent=4))
    return episodes


def test_reads_a_fixture_laid_out_as_lerobot_writes_it(tmp_path):
    episodes = _lerobot_fixture(tmp_path)
    dataset = open_lerobot(tmp_path)
    assert isinstance(dataset, LeRobotV3) and dataset.fps == 15.0 and dataset.video_keys == ["cam"]
    assert [(e.index, e.length, e.tasks) for e in dataset.episodes] == [(0, 5, ("stack the cubes",)),
                                                                         (1, 8, ("stack the cubes",))]
    assert dataset.tasks == {0: "stack the cubes"}
    np.testing.assert_array_equal(dataset.stats["action"]["q50"],
                                  np.quantile(np.concatenate([e["action"] for e in episodes.values()]), 0.5, 0))
    assert "stats/cam/mean" not in dataset.rows[1]  # read without the stats columns, as lerobot reads them
    stored = pq.read_table(tmp_path / "meta/episodes/chunk-000/file-000.parquet").column("stats/cam/mean")
    assert stored.to_pylist()[1][0][0][0] == pytest.approx(episodes[1]["cam"][..., 0].mean() / 255)
    for episode in dataset.episodes:
        table = dataset.read_table(episode, "action")
        np.testing.assert_array_equal(table.actions, episodes[episode.index]["action"])
        assert table.task_index.tolist() == [0] * episode.length
        assert psnr(dataset.read_frames(episode, "cam", episode.length), episodes[episode.index]["cam"]) >= 30.0


def test_reads_a_v21_fixture(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "data/chunk-000").mkdir(parents=True)
    (tmp_path / "videos/chunk-000/cam").mkdir(parents=True)
    info = {"codebase_version": "v2.1", "fps": 10, "chunks_size": 1000, "total_episodes": 1,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"action": {"dtype": "float32", "shape": [3], "names": None},
                         "cam": {"dtype": "video", "shape": [16, 16, 3], "names": None}}}
    (tmp_path / "meta/info.json").write_text(json.dumps(info))
    (tmp_path / "meta/tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "wave"}) + "\n")
    (tmp_path / "meta/episodes.jsonl").write_text(json.dumps({"episode_index": 0, "tasks": ["wave"], "length": 6}))
    actions = np.arange(18, dtype=np.float32).reshape(6, 3)
    pq.write_table(pa.table({"action": pa.array(actions.tolist(), pa.list_(pa.float32())),
                             "frame_index": pa.array(np.arange(6)), "episode_index": pa.array(np.zeros(6, np.int64)),
                             "task_index": pa.array(np.zeros(6, np.int64))}),
                   tmp_path / "data/chunk-000/episode_000000.parquet")
    frames = smooth_frames(6, 16, 16, 3)
    encode_mp4(tmp_path / "videos/chunk-000/cam/episode_000000.mp4", frames, 10, H264)
    dataset = open_lerobot(tmp_path)
    assert dataset.version == "v2" and dataset.tasks == {0: "wave"} and dataset.video_keys == ["cam"]
    episode = dataset.episodes[0]
    np.testing.assert_array_equal(dataset.read_table(episode, "action").actions, actions)
    np.testing.assert_array_equal(dataset.read_frames(episode, "cam", 6),
                                  decode_all(tmp_path / "videos/chunk-000/cam/episode_000000.mp4"))


def test_reader_names_the_file_for_layout_errors(tmp_path):
    _lerobot_fixture(tmp_path)
    table = pq.read_table(tmp_path / "meta/tasks.parquet").drop_columns(["task"])
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "meta/tasks.parquet")
    with pytest.raises(ValueError, match="tasks.parquet: needs a task_index column and the task strings as its "
                                         "pandas index"):
        open_lerobot(tmp_path)
    (tmp_path / "meta/info.json").write_text(json.dumps({"codebase_version": "v4.0"}))
    with pytest.raises(ValueError, match="codebase_version 'v4.0' is not supported"):
        open_lerobot(tmp_path)
    (tmp_path / "meta/info.json").write_text(json.dumps({"codebase_version": "v3.0", "fps": 10}))
    with pytest.raises(ValueError, match="info.json \\(codebase_version v3.0\\) lacks \\['features'"):
        open_lerobot(tmp_path)


# ------------------------------------------------------------------------------------------- registry


def test_registry_is_the_prompt_tables_source():
    assert dict(EMBODIMENT_DOMAINS) == {name: e.domain_id for name, e in EMBODIMENTS.items()}
    assert dict(RAW_ACTION_DIM) == {n: len(e.channels) for n, e in EMBODIMENTS.items() if e.channels}
    assert embodiment("pusht").channels == ("x", "y") and embodiment("pusht").kind == "target"
    assert embodiment("bridge_orig_lerobot").channels[-1] == "gripper" and embodiment("hand_pose").raw_action_dim == 57
    for entry in EMBODIMENTS.values():
        assert len(set(entry.channels or ())) == len(entry.channels or ()), entry.name


@pytest.mark.parametrize("mode", ["quantile", "mean_std"])
def test_normalisation_round_trip_for_every_domain(mode, tmp_path):
    domains = [name for name, e in EMBODIMENTS.items() if e.raw_action_dim]
    assert len(domains) == 15
    for name in domains:
        width = embodiment(name).raw_action_dim
        rng = np.random.default_rng(width)
        raw = rng.normal(3.0, 2.0, size=(64, width)) * rng.uniform(0.01, 10.0, width)
        raw[:, 0] = 0.25  # a constant channel
        rows = raw.astype(np.float64)
        stats = {"min": rows.min(0), "max": rows.max(0), "mean": rows.mean(0), "std": rows.std(0),
                 "count": np.array([64]), "q01": np.quantile(rows, 0.01, 0), "q99": np.quantile(rows, 0.99, 0)}
        normalizer = normalizer_from_stats(name, stats, mode=mode)
        model = normalizer.to_model(raw)
        if mode == "quantile":
            assert np.all(np.abs(np.quantile(model[:, 1:], [0.01, 0.99], 0)) <= 1 + 1e-9)
        else:
            np.testing.assert_allclose(model[:, 1:].mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(normalizer.to_raw(model), raw, rtol=0, atol=1e-6)
        write_normalizer(tmp_path / f"{name}.json", normalizer)
        again = read_normalizer(tmp_path / f"{name}.json")
        np.testing.assert_allclose(again.to_raw(model), raw, rtol=0, atol=1e-6)
        assert again.to_json()["names"] == list(embodiment(name).channels)


def test_normalisation_errors(tmp_path):
    good = {"mean": np.zeros(2), "std": np.ones(2), "q01": -np.ones(2), "q99": np.ones(2)}
    with pytest.raises(ValueError, match="unknown embodiment domain 'mars_rover'"):
        normalizer_from_stats("mars_rover", good)
    with pytest.raises(ValueError, match="stat 'mean' has shape \\[2\\], domain 'bridge_orig_lerobot' has 10"):
        normalizer_from_stats("bridge_orig_lerobot", good)
    with pytest.raises(ValueError, match="quantile normalisation needs stats \\['q01', 'q99'\\]"):
        normalizer_from_stats("pusht", {"mean": np.zeros(2), "std": np.ones(2)})
    with pytest.raises(ValueError, match="stat 'q99' is not finite in channel\\(s\\) \\[1\\]"):
        normalizer_from_stats("pusht", {**good, "q99": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="'libero' has no fixed action width"):
        normalizer_from_stats("libero", good)
    normalizer = normalizer_from_stats("pusht", good)
    with pytest.raises(ValueError, match="width 3 do not fit the 'pusht' stats \\(width 2\\)"):
        normalizer.to_raw(np.zeros((4, 3)))
    path = tmp_path / "action_stats.json"
    write_normalizer(path, normalizer)
    broken = json.loads(path.read_text())
    broken["stats"]["q01"] = [0.0, None]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="action_stats.json: stat 'q01' is not finite"):
        read_normalizer(path)
    with pytest.raises(ValueError, match="missing: no action stats"):
        read_normalizer(tmp_path / "none.json")
    assert isinstance(normalizer, ActionNormalizer) and normalizer.kind == "target"


def test_rewriting_a_dataset_needs_overwrite(written, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(written, copy)
    with pytest.raises(FileExistsError, match="overwrite"):
        LeRobotWriter(copy, fps=FPS, features=FEATURES)


def test_stats_travel_and_generated_actions_are_written_in_raw_units(tmp_path):
    from PIL import Image

    from cosmos_jax.datasets.normalization import copy_stats_file, normalizer_for_domain
    from cosmos_jax.sampling import media

    width = embodiment("bridge_orig_lerobot").raw_action_dim
    rows = np.random.default_rng(0).normal(size=(50, width)) * np.arange(1, width + 1)
    stats = {"mean": rows.mean(0), "std": rows.std(0), "q01": np.quantile(rows, 0.01, 0),
             "q99": np.quantile(rows, 0.99, 0)}
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    write_normalizer(data / "action_stats.json", normalizer_from_stats("bridge_orig_lerobot", stats))
    assert copy_stats_file(data, run) == run / "action_stats.json"
    assert copy_stats_file(tmp_path / "none", run / "x") is None
    normalizer = normalizer_for_domain(run / "action_stats.json", "bridge_orig_lerobot")
    with pytest.raises(ValueError, match="do not fit domain 'pusht' \\(2 channels\\)"):
        normalizer_for_domain(run / "action_stats.json", "pusht")

    model = np.random.default_rng(1).uniform(-1, 1, (8, width)).astype(np.float32)
    raw_paths = media.write_actions(str(tmp_path / "raw"), model, domain="bridge_orig_lerobot", mode="policy",
                                    normalizer=normalizer)
    np.testing.assert_allclose(np.load(raw_paths[0]), normalizer.to_raw(model), rtol=1e-6, atol=1e-6)
    written = json.loads(Path(raw_paths[1]).read_text())
    assert written["space"] == "raw" and written["channels"] == list(embodiment("bridge_orig_lerobot").channels)
    model_paths = media.write_actions(str(tmp_path / "model"), model, domain="bridge_orig_lerobot", mode="policy")
    np.testing.assert_array_equal(np.load(model_paths[0]), model)
    assert json.loads(Path(model_paths[1]).read_text())["space"] == "model"

    named = np.asarray(media.action_plot(model, "t", channel_names=embodiment("bridge_orig_lerobot").channels,
                                         units="raw units"))
    plain = np.asarray(media.action_plot(model, "t"))
    assert named.shape == plain.shape == (480, 800, 3) and (named != plain).any()
    assert Image.open(raw_paths[2]).size == (800, 480)
    with pytest.raises(ValueError, match="2 channel names for 10 action channels"):
        media.action_plot(model, "t", channel_names=["a", "b"])


def test_generated_actions_say_their_space_in_info_json(tmp_path):
    from cosmos_jax.datasets.normalization import action_feature, dataset_actions

    model = np.random.default_rng(2).uniform(-1, 1, (6, 2)).astype(np.float32)
    normalizer = normalizer_from_stats("pusht", {"q01": np.array([0.0, 10.0]), "q99": np.array([512.0, 500.0]),
                                                 "mean": np.array([256.0, 255.0]), "std": np.array([100.0, 90.0])})
    for name, stats in (("model", None), ("raw", normalizer)):
        root = tmp_path / name
        with LeRobotWriter(root, fps=FPS, features={"action": action_feature("pusht", stats)}) as writer:
            writer.add_episode(task="push", columns={"action": dataset_actions(model, stats)})
        feature = json.loads((root / "meta/info.json").read_text())["features"]["action"]
        assert feature["names"] == ["x", "y"]
        assert feature["info"] == {"space": name, "kind": "target", "embodiment": "pusht", "domain_id": 4}
        dataset = open_lerobot(root)
        stored = dataset.read_table(dataset.episodes[0], "action").actions
        want = model if stats is None else (normalizer.to_raw(model)).astype(np.float32)
        np.testing.assert_array_equal(stored, want)
    assert np.abs(want).max() > 50  # raw pusht units (pixels), not the model's [-1, 1]
    with pytest.raises(ValueError, match="'libero' has no fixed action width"):
        action_feature("libero", None)


def test_episode_rows_out_of_order_are_refused(tmp_path):
    _lerobot_fixture(tmp_path)
    path = tmp_path / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.take([1, 0]), path)
    with pytest.raises(ValueError, match="file-000.parquet row 1: episode 0 after episode 1: episode rows must be in "
                                         "episode order"):
        open_lerobot(tmp_path)


def test_generate_reads_and_writes_actions_in_raw_units_with_the_stats_file(tmp_path):
    import argparse
    import types

    from cosmos_jax.commands import generate

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    normalizer = normalizer_from_stats("pusht", {"q01": np.array([10.0, 20.0]), "q99": np.array([500.0, 480.0]),
                                                 "mean": np.array([250.0, 240.0]), "std": np.array([90.0, 80.0])})
    write_normalizer(model_dir / "action_stats.json", normalizer)
    raw_in = np.array([[10.0, 20.0], [255.0, 250.0], [500.0, 480.0]], np.float32)
    np.save(tmp_path / "in.npy", raw_in)
    seen = {}

    def pipeline(request, progress=True):
        seen["actions"] = request.actions
        return types.SimpleNamespace(latents=np.zeros((1, 2)), sound_latents=None, mode="forward_dynamics",
                                     actions=np.array([[-1.0, 1.0], [0.0, 0.0]], np.float32),
                                     timings={"compile": 0.0, "denoise": 0.0, "decode": 0.0})

    parser = argparse.ArgumentParser()
    generate.add_parser(parser)
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "first.png")  # generate reads it up front
    argv = ["--model", str(model_dir), "--prompt", "push", "--action-mode", "forward_dynamics", "--domain", "pusht",
            "--image", str(tmp_path / "first.png"),  # a GenerationRequest needs one; the stand-in never reads it
            "--actions", str(tmp_path / "in.npy"), "--output-type", "latent", "--output", str(tmp_path / "o.npy")]
    generate.generate_and_write(pipeline, parser.parse_args(argv))
    np.testing.assert_allclose(seen["actions"], [[-1, -1], [0, 0], [1, 1]], atol=1e-6)  # raw -> model space
    np.testing.assert_allclose(np.load(tmp_path / "o.actions.npy"), [[10, 480], [255, 250]], atol=1e-4)
    assert json.loads((tmp_path / "o.actions.json").read_text())["space"] == "raw"
    (model_dir / "action_stats.json").unlink()
    generate.generate_and_write(pipeline, parser.parse_args(argv))
    np.testing.assert_array_equal(seen["actions"], raw_in)  # no stats: given and written as they are
    assert json.loads((tmp_path / "o.actions.json").read_text())["space"] == "model"
    with pytest.raises(ValueError, match="--action-stats applies to action modes"):
        generate.generate_and_write(pipeline, parser.parse_args(
            ["--model", str(model_dir), "--prompt", "x", "--action-stats", "s.json", "--output", "o.mp4"]))

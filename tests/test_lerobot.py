"""LeRobot v2 -> cosmos-jax preparation: clip grid, crop, VAE latents, actions, captions, bad episodes, the CLI
and the training loader reading the result.

The dataset is synthetic (tmp_path): 10 fps, chunks_size 2 (episodes 2.. live in chunk-001), one 32x48 camera
(h264 mp4, random frames), 2-D actions, two tasks. Episodes 0 (13 frames: 2 clips of 5) and 1 (9 frames: 1 clip)
are good; 2 (video 7 frames, parquet 9 rows), 3 (NaN action), 4 (no video) and 5 (3-wide actions) are bad.
The VAE is the demo's tiny random Wan VAE (spatial compression 16). Expected latents are a direct, unjitted,
unbatched `encode` + `normalize_latents` of the frames decoded from the mp4 and cropped by hand to the centre
32x32 (no resize: the cover scale is 1); measured max abs difference 1.2e-6 on latents of magnitude ~2 (fp32,
CPU), asserted <= 1e-4 x max(1, max |expected|).

The v3.0 source is written with `LeRobotWriter` (2 cameras of random 32x48 frames, libx264, 3 episodes of 13,
9 and 11 frames, a 2 KB data-file limit so that the parquet rolls over); its expected latents are the same
direct encode of every frame of the camera's mp4 decoded and cut at the episode's from_timestamp: measured max
abs difference 1.4e-6 on latents of magnitude ~1.9, same tolerance. Actions equal the parquet rows exactly, or
(delta, 10 -> 5 fps) the sums of each pair of rows within 1e-6.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmos_jax import cli
from cosmos_jax.config import load_preset
from cosmos_jax.convert.keymap_vae import vae_state_from_params
from cosmos_jax.convert.safetensors_io import write_checkpoint
from cosmos_jax.demo import TINY_VAE
from cosmos_jax.modeling.wan_vae import (
    WanVAEConfig,
    encode,
    init_params,
    normalize_latents,
)
from cosmos_jax.sampling.prompts import ChatTokenizer, build_prompt_ids
from cosmos_jax.tiny_tokenizer import write_tiny_tokenizer
from cosmos_jax.training import data as data_lib
from cosmos_jax.datasets.lerobot_prepare import (
    BadEpisode,
    PrepareConfig,
    clip_indices,
    fit_frame,
    prepare_lerobot,
)
from cosmos_jax.datasets.lerobot_v2 import read_info
from cosmos_jax.datasets.lerobot_v3 import LeRobotV3
from cosmos_jax.datasets.lerobot_writer import LeRobotWriter, vector_feature, video_feature
from cosmos_jax.datasets.normalization import read_normalizer
from cosmos_jax.datasets.video import VideoEncoding, decode_all, encode_mp4

FPS = 10
SRC_H, SRC_W = 32, 48
SIZE = 32
FRAMES = 5
CAMERA = "observation.images.front"
TASKS = ("push the disc", "open the drawer")
# episode index -> (parquet rows, video frames or None for no file, action width, task index, NaN row or None)
EPISODES = {0: (13, 13, 2, 0, None), 1: (9, 9, 2, 1, None), 2: (9, 7, 2, 0, None), 3: (9, 9, 2, 0, 4),
            4: (9, None, 2, 0, None), 5: (9, 9, 3, 1, None)}
BAD = {2: "7 frames", 3: "not finite in frame(s) [4]", 4: "is missing", 5: "wrong action width"}
TOL = 1e-4


def _episode_actions(index: int, rows: int, width: int, nan_row: int | None) -> np.ndarray:
    actions = np.random.default_rng(100 + index).uniform(-1, 1, (rows, width)).astype(np.float32)
    if nan_row is not None:
        actions[nan_row, 0] = np.nan
    return actions


def _write_episode(root: Path, index: int) -> None:
    rows, video_frames, width, task, nan_row = EPISODES[index]
    chunk = f"chunk-{index // 2:03d}"
    actions = _episode_actions(index, rows, width, nan_row)
    table = pa.table({
        "action": pa.array(actions.tolist(), pa.list_(pa.float32())),
        "timestamp": pa.array(np.arange(rows, dtype=np.float32) / FPS),
        "frame_index": pa.array(np.arange(rows, dtype=np.int64)),
        "episode_index": pa.array(np.full(rows, index, np.int64)),
        "index": pa.array(np.arange(rows, dtype=np.int64)),
        "task_index": pa.array(np.full(rows, task, np.int64)),
    })
    (root / "data" / chunk).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "data" / chunk / f"episode_{index:06d}.parquet")
    if video_frames is not None:
        frames = np.random.default_rng(index).integers(0, 256, (video_frames, SRC_H, SRC_W, 3), dtype=np.uint8)
        folder = root / "videos" / chunk / CAMERA
        folder.mkdir(parents=True, exist_ok=True)
        iio.imwrite(folder / f"episode_{index:06d}.mp4", frames, fps=FPS, codec="libx264")


def _write_lerobot(root: Path, episodes: tuple[int, ...]) -> Path:
    (root / "meta").mkdir(parents=True)
    info = {
        "codebase_version": "v2.1", "robot_type": "test", "total_episodes": len(episodes), "chunks_size": 2,
        "fps": FPS, "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": {
            "action": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
            CAMERA: {"dtype": "video", "shape": [SRC_H, SRC_W, 3], "names": ["height", "width", "channels"]},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "tasks.jsonl").write_text("".join(
        json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": i, "tasks": [TASKS[EPISODES[i][3]]], "length": EPISODES[i][0]}) + "\n"
        for i in episodes))
    for index in episodes:
        _write_episode(root, index)
    return root


@pytest.fixture(scope="module")
def lerobot_dir(tmp_path_factory) -> Path:
    return _write_lerobot(tmp_path_factory.mktemp("lerobot"), tuple(EPISODES))


@pytest.fixture(scope="module")
def vae() -> tuple[WanVAEConfig, dict]:
    """The demo's tiny VAE with random weights: kernels N(0, 1/fan_in), every other leaf 1 + N(0, 0.1²) (norm
    scales) or N(0, 0.1²) (biases), drawn in numpy from the abstract tree (an eager `init_params` takes minutes)."""
    config = WanVAEConfig(**TINY_VAE)
    rng = np.random.default_rng(3)

    def fill(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.startswith("kernel"):
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        return (name in ("gamma", "scale")) + 0.1 * noise

    abstract = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    return config, jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vae) -> Path:
    """A model folder with what `prepare` reads: transformer/config.json (tiny preset), vae/, text_tokenizer/."""
    root = tmp_path_factory.mktemp("model")
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(load_preset("tiny").to_dict()))
    config, params = vae
    state = {k: np.asarray(v, np.float32) for k, v in vae_state_from_params(jax.device_get(params), config).items()}
    write_checkpoint(root / "vae", state, max_shard_bytes=1 << 30)
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", **config.to_dict()}))
    write_tiny_tokenizer(root / "text_tokenizer")
    return root


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> ChatTokenizer:
    return ChatTokenizer.from_dir(model_dir / "text_tokenizer")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, lerobot_dir, vae, tokenizer):
    config, params = vae
    dst = tmp_path_factory.mktemp("out") / "prepared"
    report = prepare_lerobot(lerobot_dir, dst, config, params, tokenizer.encode,
                             PrepareConfig(frames=FRAMES, height=SIZE, width=SIZE, domain=4, batch_size=2,
                                           skip_bad=True),
                             latent_patch_size=2, action_dim=64, num_domains=32, progress=False)
    return dst, report


def _decoded_clip(root: Path, episode: int, indices: np.ndarray) -> np.ndarray:
    """[3, F, SIZE, SIZE] in [-1, 1]: the mp4's frames, centre 32 columns, as the pipeline scales pixels."""
    chunk = f"chunk-{episode // 2:03d}"
    frames = np.stack(list(iio.imiter(root / "videos" / chunk / CAMERA / f"episode_{episode:06d}.mp4")))
    left = (SRC_W - SIZE) // 2
    crop = frames[indices, :, left: left + SIZE].astype(np.float32)
    return (crop / np.float32(127.5) - np.float32(1.0)).transpose(3, 0, 1, 2)


def test_clip_grid():
    assert [c.tolist() for c in clip_indices(13, 10.0, 5, 5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [c.tolist() for c in clip_indices(13, 10.0, 5, 2)] == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6],
                                                                  [4, 5, 6, 7, 8], [6, 7, 8, 9, 10],
                                                                  [8, 9, 10, 11, 12]]
    # 30 fps -> 12 fps: grid frame g is source frame round(2.5 g)
    assert [c.tolist() for c in clip_indices(40, 30.0, 5, 4, fps=12.0)] == [[0, 3, 5, 8, 10], [10, 13, 15, 18, 20],
                                                                           [20, 23, 25, 28, 30]]
    assert clip_indices(4, 10.0, 5, 5) == []
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        clip_indices(13, 10.0, 6, 5)
    with pytest.raises(ValueError, match="no upsampling"):
        clip_indices(13, 10.0, 5, 5, fps=20.0)
    with pytest.raises(ValueError, match="stride"):
        clip_indices(13, 10.0, 5, 0)


def test_fit_frame_covers_and_centre_crops():
    rows, cols = np.meshgrid(np.arange(32), np.arange(48), indexing="ij")
    frame = np.stack([rows * 4, cols * 4, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(fit_frame(frame, 32, 32), frame[:, 8:40])  # scale 1: a pure centre crop
    half = fit_frame(np.repeat(np.repeat(frame, 2, 0), 2, 1), 32, 32)  # 64x96 -> scale 1/2, then crop
    assert half.shape == (32, 32, 3)
    assert np.abs(half.astype(int) - frame[:, 8:40]).max() <= 2


def test_prepare_writes_latents_actions_captions(prepared, lerobot_dir, vae, tokenizer):
    dst, report = prepared
    assert report.samples == 3 and report.episodes == 2
    assert [i for i, _ in report.bad_episodes] == [2, 3, 4, 5]
    for index, reason in report.bad_episodes:
        assert BAD[index] in reason, (index, reason)
    meta = data_lib.read_meta(str(dst))
    assert meta == data_lib.DatasetMeta((48, 2, 2, 2), 10.0, FRAMES - 1, 2)
    entries = data_lib.read_index(str(dst))
    assert [e["id"] for e in entries] == ["ep000000_clip0000", "ep000000_clip0001", "ep000001_clip0000"]
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".")]  # temporary folder gone
    config, params = vae
    expected_clips = {"ep000000_clip0000": (0, np.arange(0, 5)), "ep000000_clip0001": (0, np.arange(5, 10)),
                      "ep000001_clip0000": (1, np.arange(0, 5))}
    for entry in entries:
        episode, indices = expected_clips[entry["id"]]
        with np.load(dst / entry["file"], allow_pickle=False) as z:
            sample = {k: z[k] for k in z.files}
        video = jnp.asarray(_decoded_clip(lerobot_dir, episode, indices)[None])
        want = np.asarray(normalize_latents(encode(params, video, config), config.latents_mean, config.latents_std,
                                            jnp.float32))[0]
        assert sample["latents"].shape == want.shape == (48, 2, 2, 2)
        err = np.abs(sample["latents"] - want).max()
        assert err <= TOL * max(1.0, np.abs(want).max()), (entry["id"], err)
        rows, _, width, task, nan_row = EPISODES[episode]
        np.testing.assert_array_equal(sample["actions"], _episode_actions(episode, rows, width, nan_row)[indices[:-1]])
        np.testing.assert_array_equal(sample["caption_ids"], tokenizer.encode(TASKS[task]))
        assert int(sample["domain"]) == 4


def test_video_only_and_overwrite(tmp_path, lerobot_dir, vae, tokenizer, prepared):
    config, params = vae
    dst = tmp_path / "video"
    dst.mkdir()
    (dst / "stale.txt").write_text("replaced")
    report = prepare_lerobot(lerobot_dir, dst, config, params, tokenizer.encode,
                             PrepareConfig(frames=FRAMES, height=SIZE, width=SIZE, action_key=None, batch_size=3,
                                           skip_bad=True), latent_patch_size=2, overwrite=True, progress=False)
    assert [i for i, _ in report.bad_episodes] == [2, 4]  # actions are not read: episodes 3 and 5 are fine
    assert report.samples == 5 and not (dst / "stale.txt").exists()
    assert data_lib.read_meta(str(dst)) == data_lib.DatasetMeta((48, 2, 2, 2), 10.0, None, None)
    with np.load(dst / "samples" / "ep000000_clip0001.npz") as z, \
            np.load(prepared[0] / "samples" / "ep000000_clip0001.npz") as ref:
        assert sorted(z.files) == ["caption_ids", "latents"]
        # batch of 3 vs batch of 2 compile to different programs: measured 1e-6 apart
        np.testing.assert_allclose(z["latents"], ref["latents"], rtol=0, atol=1e-5)


def test_resampled_clips_take_the_grid_frames_actions(tmp_path, lerobot_dir, vae, tokenizer):
    config, params = vae
    dst = tmp_path / "5fps"
    report = prepare_lerobot(lerobot_dir, dst, config, params, tokenizer.encode,
                             PrepareConfig(frames=FRAMES, height=SIZE, width=SIZE, fps=5.0, batch_size=2, skip_bad=True),
                             latent_patch_size=2, progress=False)
    assert report.samples == 2 and data_lib.read_meta(str(dst)).fps == 5.0
    grid = np.arange(0, 10, 2)  # 10 fps -> 5 fps: source frames 0, 2, 4, 6, 8; one clip per good episode
    for episode in (0, 1):
        rows, _, width, _, nan_row = EPISODES[episode]
        with np.load(dst / "samples" / f"ep{episode:06d}_clip0000.npz") as z:
            np.testing.assert_array_equal(z["actions"], _episode_actions(episode, rows, width, nan_row)[grid[:-1]])
            want = normalize_latents(encode(params, jnp.asarray(_decoded_clip(lerobot_dir, episode, grid)[None]),
                                            config), config.latents_mean, config.latents_std, jnp.float32)
            np.testing.assert_allclose(z["latents"], np.asarray(want)[0], rtol=0, atol=TOL)


def test_bad_episode_is_fatal_without_skip(tmp_path, lerobot_dir, vae, tokenizer):
    config, params = vae
    dst = tmp_path / "out"
    with pytest.raises(BadEpisode, match="bad episode 2: video 'observation.images.front' has 7 frames") as e:
        prepare_lerobot(lerobot_dir, dst, config, params, tokenizer.encode,
                        PrepareConfig(frames=FRAMES, height=SIZE, width=SIZE, batch_size=2),
                        latent_patch_size=2, progress=False)
    assert e.value.episode == 2
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even the temporary folder


@pytest.mark.parametrize(("change", "kwargs", "match"), [
    ({"height": 48}, {}, "multiples of 32"),
    ({"video_key": "observation.images.wrist"}, {}, "video keys: \\['observation.images.front'\\]"),
    ({}, {"action_dim": 1}, "action width 2"),
    ({"domain": 32}, {}, "domain 32 is outside"),
    ({"frames": 6}, {}, "1 \\+ 4k"),
    ({"action_key": "effort"}, {}, "no feature 'effort'"),
])
def test_config_errors(tmp_path, lerobot_dir, vae, change, kwargs, match):
    config, params = vae
    settings = {"frames": FRAMES, "height": SIZE, "width": SIZE} | change
    with pytest.raises(ValueError, match=match):
        prepare_lerobot(lerobot_dir, tmp_path / "out", config, params, list,
                        PrepareConfig(**settings), **{"latent_patch_size": 2, "action_dim": 64, "num_domains": 32,
                                                      **kwargs})


def test_path_templates(tmp_path):
    (tmp_path / "meta").mkdir()
    info = {"codebase_version": "v2.0", "fps": 10, "chunks_size": 1000, "total_episodes": 206, "features": {},
            "data_path": "data/chunk-{episode_chunk:03d}/train-{episode_index:05d}-of-{total_episodes:05d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}
    (tmp_path / "meta" / "info.json").write_text(json.dumps(info))
    parsed = read_info(tmp_path)
    assert parsed.parquet_path(1205) == tmp_path / "data/chunk-001/train-01205-of-00206.parquet"
    assert parsed.video_file(7, "cam") == tmp_path / "videos/chunk-000/cam/episode_000007.mp4"
    (tmp_path / "meta" / "info.json").write_text(json.dumps({**info, "data_path": "data/{episode_number}.parquet"}))
    with pytest.raises(ValueError, match="cannot fill path template 'data/{episode_number}.parquet'"):
        read_info(tmp_path).parquet_path(0)


def test_not_a_lerobot_folder(tmp_path):
    with pytest.raises(ValueError, match="meta/info.json is missing"):
        read_info(tmp_path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v3.0"}))
    with pytest.raises(ValueError, match="v3.0"):
        read_info(tmp_path)


def test_cli_matches_library_and_loader_reads_it(tmp_path, lerobot_dir, model_dir, prepared, capsys):
    dst = tmp_path / "cli"
    argv = ["prepare", "lerobot", str(lerobot_dir), str(dst), "--model", str(model_dir), "--frames", str(FRAMES),
            "--size", f"{SIZE}x{SIZE}", "--domain", "pusht", "--batch", "2", "--no-progress"]
    assert cli.main(argv) == 1  # episode 2 is bad
    assert "bad episode 2" in capsys.readouterr().err and not dst.exists()
    assert cli.main([*argv, "--skip-bad"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 3 and [b["episode"] for b in summary["bad_episodes"]] == [2, 3, 4, 5]
    assert cli.main([*argv, "--skip-bad"]) == 2  # DST exists: one line naming --overwrite, no traceback
    assert "--overwrite" in capsys.readouterr().err
    chat_dst = tmp_path / "chat"
    assert cli.main([*argv[:3], str(chat_dst), *argv[4:], "--skip-bad", "--caption", "chat"]) == 0
    capsys.readouterr()
    with np.load(chat_dst / "samples" / "ep000001_clip0000.npz") as z:
        want = build_prompt_ids(model_dir / "text_tokenizer", TASKS[1], num_frames=FRAMES, height=SIZE, width=SIZE,
                                fps=FPS)
        np.testing.assert_array_equal(z["caption_ids"], want)
    library_dst, _ = prepared
    for entry in data_lib.read_index(str(dst)):
        with np.load(dst / entry["file"]) as ours, np.load(library_dst / entry["file"]) as lib:
            np.testing.assert_allclose(ours["latents"], lib["latents"], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(ours["actions"], lib["actions"])
            assert int(ours["domain"]) == 4  # "pusht"

    model = load_preset("tiny")
    loader, _, bad = data_lib.make_loader(str(dst), model, data_lib.PipelineConfig(batch_size=2, max_text_len=16),
                                             shard=data_lib.grain.NoSharding())
    batch = data_lib.to_train_batch(next(iter(loader)))
    assert batch.gen.vision.shape == (2, 48, 2, 2, 2)
    assert batch.gen.action.shape == (2, FRAMES - 1, 64)
    assert np.all(batch.gen.action[:, :, 2:] == 0) and np.all(batch.gen.action_domain == 4)
    assert batch.action_width.tolist() == [2, 2] and not bad.skipped


# ------------------------------------------------------------------------------------------- LeRobot v3.0 sources

V3_CAMERAS = ("observation.images.front", "observation.images.side")
V3_LENGTHS = (13, 9, 11)


def _v3_actions(index: int) -> np.ndarray:
    return np.random.default_rng(200 + index).uniform(-1, 1, (V3_LENGTHS[index], 2)).astype(np.float32)


def _v3_frames(index: int, camera: int) -> np.ndarray:
    rng = np.random.default_rng(300 + 10 * index + camera)
    return rng.integers(0, 256, (V3_LENGTHS[index], SRC_H, SRC_W, 3), dtype=np.uint8)


def _write_v3(root: Path) -> Path:
    features = {"action": vector_feature(["x", "y"]), **{k: video_feature(SRC_H, SRC_W) for k in V3_CAMERAS}}
    with LeRobotWriter(root, fps=FPS, features=features, encoding=VideoEncoding(codec="libx264"),
                       data_files_size_in_mb=0.002, video_files_size_in_mb=0.03) as writer:
        for index in range(len(V3_LENGTHS)):
            writer.add_episode(task=TASKS[index % 2], columns={"action": _v3_actions(index)},
                               frames={k: _v3_frames(index, c) for c, k in enumerate(V3_CAMERAS)})
    return root


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory) -> Path:
    return _write_v3(tmp_path_factory.mktemp("lerobot_v3") / "dataset")


def _v3_decoded_clip(root: Path, episode: int, camera: str, indices: np.ndarray) -> np.ndarray:
    """[3, F, SIZE, SIZE] in [-1, 1]: every frame of the camera's mp4 decoded, the episode's located by its
    from_timestamp, centre 32 columns."""
    row = LeRobotV3(root).rows[episode]
    path = root / f"videos/{camera}/chunk-000/file-{row[f'videos/{camera}/file_index']:03d}.mp4"
    first = round(row[f"videos/{camera}/from_timestamp"] * FPS)
    frames = decode_all(path)[first: first + V3_LENGTHS[episode]]
    left = (SRC_W - SIZE) // 2
    crop = frames[indices, :, left: left + SIZE].astype(np.float32)
    return (crop / np.float32(127.5) - np.float32(1.0)).transpose(3, 0, 1, 2)


def _parquet_actions(root: Path, episode: int) -> np.ndarray:
    """The episode's action rows read straight from the data parquet files."""
    tables = [pq.read_table(p) for p in sorted((root / "data").glob("*/*.parquet"))]
    table = pa.concat_tables(tables)
    mask = np.asarray(table.column("episode_index").to_numpy()) == episode
    return np.asarray(table.column("action").to_pylist(), np.float32)[mask]


def _expected_latents(params, config, clip: np.ndarray) -> np.ndarray:
    return np.asarray(normalize_latents(encode(params, jnp.asarray(clip[None]), config), config.latents_mean,
                                        config.latents_std, jnp.float32))[0]


def test_prepare_v3_latents_actions_and_stats(tmp_path, v3_dir, vae, tokenizer):
    assert len(list((v3_dir / "data").glob("*/*.parquet"))) >= 2  # the data rolled over
    config, params = vae
    dst = tmp_path / "v3"
    report = prepare_lerobot(v3_dir, dst, config, params, tokenizer.encode,
                             PrepareConfig(frames=FRAMES, height=SIZE, width=SIZE, video_key=V3_CAMERAS[1], domain=4,
                                           batch_size=2), latent_patch_size=2, action_dim=64, num_domains=32,
                             progress=False)
    assert (report.samples, report.episodes, report.bad_episodes) == (5, 3, [])
    entries = data_lib.read_index(str(dst))
    assert [e["id"] for e in entries] == ["ep000000_clip0000", "ep000000_clip0001", "ep000001_clip0000",
                                          "ep000002_clip0000", "ep000002_clip0001"]
    written = []
    for entry in entries:
        episode, clip = int(entry["id"][2:8]), int(entry["id"][-4:])
        indices = np.arange(clip * FRAMES, (clip + 1) * FRAMES)
        with np.load(dst / entry["file"]) as z:
            want = _expected_latents(params, config, _v3_decoded_clip(v3_dir, episode, V3_CAMERAS[1], indices))
            err = np.abs(z["latents"] - want).max()
            assert err <= TOL * max(1.0, np.abs(want).max()), (entry["id"], err)
            np.testing.assert_array_equal(z["actions"], _parquet_actions(v3_dir, episode)[indices[:-1]])
            np.testing.assert_array_equal(z["actions"], _v3_actions(episode)[indices[:-1]])
            np.testing.assert_array_equal(z["caption_ids"], tokenizer.encode(TASKS[episode % 2]))
            written.append(z["actions"])
    stats = json.loads((dst / "action_stats.json").read_text())
    assert (stats["domain"], stats["kind"], stats["mode"], stats["names"]) == ("pusht", "absolute", "quantile",
                                                                               ["x", "y"])
    rows = np.concatenate(written).astype(np.float64)
    np.testing.assert_array_equal(stats["stats"]["q99"], np.quantile(rows, 0.99, axis=0))
    np.testing.assert_array_equal(stats["stats"]["mean"], rows.mean(0))


def test_prepare_v3_every_camera_with_summed_deltas(tmp_path, v3_dir, vae, tokenizer, model_dir, capsys):
    config, params = vae
    dst = tmp_path / "delta"
    report = prepare_lerobot(v3_dir, dst, config, params, tokenizer.encode,
                             PrepareConfig(frames=FRAMES, height=SIZE, width=SIZE, all_cameras=True, fps=5.0,
                                           action_kind="delta", domain=4, batch_size=2),
                             latent_patch_size=2, action_dim=64, num_domains=32, progress=False)
    assert report.samples == 6  # one clip per episode per camera at 5 fps
    grid = np.arange(0, 10, 2)  # source frames 0, 2, 4, 6, 8
    for episode in range(3):
        actions = _parquet_actions(v3_dir, episode)
        summed = actions[grid[:-1]] + actions[grid[:-1] + 1]  # the rows of the skipped frames added in
        for camera in V3_CAMERAS:
            with np.load(dst / "samples" / f"ep{episode:06d}_clip0000_{camera}.npz") as z:
                np.testing.assert_allclose(z["actions"], summed, rtol=0, atol=1e-6)
                want = _expected_latents(params, config, _v3_decoded_clip(v3_dir, episode, camera, grid))
                np.testing.assert_allclose(z["latents"], want, rtol=0, atol=TOL * max(1.0, np.abs(want).max()))
    cli_dst = tmp_path / "cli"
    assert cli.main(["prepare", "lerobot", str(v3_dir), str(cli_dst), "--model", str(model_dir), "--frames",
                     str(FRAMES), "--size", f"{SIZE}x{SIZE}", "--domain", "pusht", "--all-cameras", "--fps", "5",
                     "--action-kind", "delta", "--batch", "2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 6 and summary["action_kind"] == "delta"
    with np.load(cli_dst / "samples" / f"ep000001_clip0000_{V3_CAMERAS[0]}.npz") as ours, \
            np.load(dst / "samples" / f"ep000001_clip0000_{V3_CAMERAS[0]}.npz") as lib:
        np.testing.assert_array_equal(ours["actions"], lib["actions"])
    with pytest.raises(ValueError, match="does not fit domain 7 \\(bridge_orig_lerobot: 10 channels\\)"):
        prepare_lerobot(v3_dir, tmp_path / "wide", config, params, tokenizer.encode,
                        PrepareConfig(frames=FRAMES, height=SIZE, width=SIZE, all_cameras=True, domain=7),
                        latent_patch_size=2)


def _truncate_parquet(root: Path) -> tuple[str, int]:
    path = sorted((root / "data").glob("*/*.parquet"))[-1]
    first = int(pq.read_table(path).column("episode_index").to_numpy()[0])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.name, first


def _short_video(root: Path) -> tuple[str, int]:
    rows = LeRobotV3(root).rows
    last = max(e for e, r in rows.items() if r[f"videos/{V3_CAMERAS[0]}/file_index"] == 0)
    path = root / f"videos/{V3_CAMERAS[0]}/chunk-000/file-000.mp4"
    frames = decode_all(path)
    path.unlink()
    encode_mp4(path, frames[:-3], FPS, VideoEncoding(codec="libx264"))
    return "file-000.mp4", last


def _undeclared_column(root: Path) -> tuple[str, int]:
    path = sorted((root / "data").glob("*/*.parquet"))[0]
    table = pq.read_table(path)
    pq.write_table(table.append_column("effort", pa.array(np.zeros(table.num_rows, np.float32))), path)
    return "undeclared \\['effort'\\]", 0


def _index_gap(root: Path) -> tuple[str, int]:
    for path in sorted((root / "meta/episodes").glob("*/*.parquet")):
        table = pq.read_table(path)
        keep = np.asarray(table.column("episode_index").to_numpy()) != 1
        if not keep.all():
            if keep.any():
                pq.write_table(table.filter(pa.array(keep)), path)
            else:
                path.unlink()
            return "episode 1 is missing from the episode rows", 1
    raise AssertionError("episode 1 has no row")


@pytest.mark.parametrize("damage", [_truncate_parquet, _short_video, _undeclared_column, _index_gap])
def test_prepare_v3_bad_input_names_file_and_episode(tmp_path, v3_dir, vae, tokenizer, damage):
    config, params = vae
    src = tmp_path / "src"
    shutil.copytree(v3_dir, src)
    what, episode = damage(src)
    out = tmp_path / "out"
    out.mkdir()
    settings = PrepareConfig(frames=FRAMES, height=SIZE, width=SIZE, video_key=V3_CAMERAS[0], domain=4, batch_size=2)
    with pytest.raises(BadEpisode, match=f"bad episode {episode}: .*{what}") as e:
        prepare_lerobot(src, out / "prepared", config, params, tokenizer.encode, settings, latent_patch_size=2,
                        progress=False)
    assert e.value.episode == episode and list(out.iterdir()) == []  # nothing half-written
    report = prepare_lerobot(src, out / "prepared", config, params, tokenizer.encode,
                             dataclasses.replace(settings, skip_bad=True), latent_patch_size=2, progress=False)
    assert episode in [i for i, _ in report.bad_episodes] and report.samples > 0
    assert all(f"ep{i:06d}" not in p.name for i, _ in report.bad_episodes
               for p in (out / "prepared" / "samples").iterdir())


def test_cli_reports_a_dataset_error_in_one_line(tmp_path, v3_dir, model_dir, capsys):
    src = tmp_path / "src"
    shutil.copytree(v3_dir, src)
    (src / "meta/tasks.parquet").unlink()
    code = cli.main(["prepare", "lerobot", str(src), str(tmp_path / "out"), "--model", str(model_dir), "--frames",
                     str(FRAMES), "--size", f"{SIZE}x{SIZE}", "--domain", "pusht", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "meta/tasks.parquet is missing" in err and not (tmp_path / "out").exists()


def test_loader_maps_actions_to_model_space_with_the_stats_file(tmp_path, prepared):
    """The prepared folder holds raw actions and action_stats.json; the loader feeds the model
    (raw − (q99 + q01)/2) / ((q99 − q01)/2)."""
    dst, _ = prepared
    stats = json.loads((dst / "action_stats.json").read_text())["stats"]
    low, high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    meta = data_lib.read_meta(str(dst))
    entry = data_lib.read_index(str(dst))[0]
    record = {"id": entry["id"], "path": str(dst / entry["file"])}
    with np.load(dst / entry["file"]) as z:
        raw = z["actions"]
    normalizer = read_normalizer(dst / "action_stats.json")
    sample = data_lib.load_sample(record, meta, load_preset("tiny"), 16, normalizer)
    np.testing.assert_allclose(sample["actions"], (raw - (high + low) / 2) / ((high - low) / 2), rtol=1e-6, atol=1e-6)
    assert np.abs(normalizer.to_raw(sample["actions"]) - raw).max() < 1e-6
    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    (copy / "action_stats.json").write_text(json.dumps({**json.loads((dst / "action_stats.json").read_text()),
                                                        "domain": "bridge_orig_lerobot"}))
    with pytest.raises(ValueError, match="action_stats.json: stat 'min' has shape \\[2\\], domain "
                                         "'bridge_orig_lerobot' has 10"):
        data_lib.make_loader(str(copy), load_preset("tiny"), data_lib.PipelineConfig(batch_size=2, max_text_len=16),
                             shard=data_lib.grain.NoSharding())

"""The one reader for --image/--video (mp4, frames folder, .npy) and numeric .npy flags: same frames from a folder
and an array, floats rounded to uint8 levels, and every bad input named by flag and file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cosmos_jax.sampling import media, media_input


def _frames(count: int = 5, height: int = 24, width: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def _folder(path, frames, names=None):
    path.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(path / (names[i] if names else f"frame{i}.png"))
    return path


def test_frames_folder_and_npy_give_the_same_uint8_frames(tmp_path):
    frames = _frames(12)
    names = [f"f{i}.png" for i in range(12)]  # f10 after f9, not after f1
    folder = _folder(tmp_path / "clip", frames, names)
    (folder / "notes.txt").write_text("not a frame")
    np.save(tmp_path / "clip.npy", frames)
    from_folder = media_input.read_clip(folder)
    from_npy = media_input.read_clip(tmp_path / "clip.npy")
    np.testing.assert_array_equal(from_folder.frames, frames)
    np.testing.assert_array_equal(from_npy.frames, frames)
    assert from_folder.fps is None and from_npy.fps is None


def test_float_npy_is_rounded_to_uint8_levels_and_mp4_keeps_its_fps(tmp_path):
    frames = _frames(3)
    np.save(tmp_path / "float.npy", frames.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(media_input.read_clip(tmp_path / "float.npy").frames, frames)
    media.write_mp4(tmp_path / "clip.mp4", np.repeat(frames, 3, axis=0), fps=12.0)
    clip = media_input.read_clip(tmp_path / "clip.mp4")
    assert clip.frames.shape == (9, 24, 32, 3) and clip.frames.dtype == np.uint8 and clip.fps == 12.0


def test_bad_clips_and_images_are_named(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(ValueError, match=r"^--video .*garbage.mp4: cannot decode as a video") as e:
        media_input.read_clip(garbage)
    assert "\n" not in str(e.value) and "ffmpeg version" not in str(e.value)
    folder = _folder(tmp_path / "mixed", [_frames(1)[0], _frames(1, 32, 32)[0]])
    with pytest.raises(ValueError, match=r"frame1.png: frame is 32x32, but frame0.png is 32x24"):
        media_input.read_clip(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .png/.jpg/.jpeg frames"):
        media_input.read_clip(tmp_path / "empty")
    np.save(tmp_path / "shape.npy", np.zeros((4, 24, 32), np.uint8))
    with pytest.raises(ValueError, match=r"expected frames \[T, H, W, 3\], got shape \[4, 24, 32\]"):
        media_input.read_clip(tmp_path / "shape.npy")
    np.save(tmp_path / "range.npy", np.full((1, 24, 32, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"float frames must be finite and in \[0, 1\]"):
        media_input.read_clip(tmp_path / "range.npy")
    np.save(tmp_path / "int16.npy", np.zeros((1, 24, 32, 3), np.int16))
    with pytest.raises(ValueError, match="must be uint8 or float in"):
        media_input.read_clip(tmp_path / "int16.npy")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match=r"--image .*dot.png: 1x1 pixels is too small; .* at least 16x16"):
        media_input.read_image(tmp_path / "dot.png")
    with pytest.raises(ValueError, match="--video: no such file or folder"):
        media_input.read_clip(tmp_path / "missing.mp4")


@pytest.mark.parametrize("value, expected", [
    (np.array(["a", "b"]), "expected a real float or integer array, got <U1"),
    (np.array([1 + 2j]), "expected a real float or integer array, got complex128"),
    (np.array([True]), "expected a real float or integer array, got bool"),
])
def test_numeric_arrays_refuse_strings_complex_and_bool(tmp_path, value, expected):
    np.save(tmp_path / "a.npy", value)
    with pytest.raises(ValueError, match=f"--actions .*a.npy: {expected}"):
        media_input.read_array(tmp_path / "a.npy", "--actions")


def test_pickled_arrays_are_never_loaded_nor_is_unsafe_loading_suggested(tmp_path):
    np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as e:
        media_input.read_array(tmp_path / "p.npy", "--actions")
    assert "--actions" in str(e.value) and "p.npy" in str(e.value) and "pickled" in str(e.value)
    assert "allow_pickle" not in str(e.value)
    np.save(tmp_path / "ok.npy", np.arange(6, dtype=np.int64).reshape(3, 2))
    got = media_input.read_array(tmp_path / "ok.npy", "--actions")
    assert got.dtype == np.float32 and got.tolist() == [[0, 1], [2, 3], [4, 5]]

"""Every command with bad input: non-zero exit, no traceback, one line `error: ...` naming the flag or file, and
nothing left at the destination. Plus the CLI's help (every flag has help, defaults shown), --version, and the
warnings for inputs a request changes."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cosmos_jax import cli
from cosmos_jax.commands import generate as generate_command
from cosmos_jax.demo import build_demo_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo checkpoint and a set of good and bad input files."""
    d = tmp_path_factory.mktemp("cli")
    model = build_demo_checkpoint(d / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "frame.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(d / "dot.png")
    (d / "garbage.mp4").write_bytes(b"\x00\x01 not a video " * 200)
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "complex.npy", np.ones((8, 7), np.complex64))
    np.save(d / "strings.npy", np.array([["a"] * 7] * 8))
    (d / "a_file").write_text("a file, not a folder")
    (d / "exists").mkdir()
    assert cli.main(["convert", str(model), str(d / "int8"), "--quantize", "int8", "--no-progress"]) == 0
    return {"d": d, "model": str(model), "int8": str(d / "int8")}


def _cases(f):
    d, m = f["d"], f["model"]
    g = ["generate", "--model", m, "--prompt", "a cube"]
    q = ["generate", "--model", f["int8"], "--prompt", "a cube"]
    small = ["--num-frames", "9", "--height", "64", "--width", "64", "--steps", "1"]
    fwd = g + ["--action-mode", "forward_dynamics", "--domain", "bridge_orig_lerobot", "--image", f"{d}/frame.png"]
    return [
        # (argv, words the one-line message must contain, a path that must not exist afterwards)
        (g + small + ["--output", f"{d}/o1.mp4", "--model", f"{d}/nope"], ["--model", "nope"], f"{d}/o1.mp4"),
        (g + small + ["--image", f"{d}/nope.png", "--output", f"{d}/o2.mp4"], ["--image", "nope.png"], f"{d}/o2.mp4"),
        (g + small + ["--image", f"{d}/dot.png", "--output", f"{d}/o3.mp4"], ["--image", "dot.png", "too small"],
         f"{d}/o3.mp4"),
        (g + small + ["--video", f"{d}/garbage.mp4", "--output", f"{d}/o4.mp4"], ["--video", "garbage.mp4"],
         f"{d}/o4.mp4"),
        (fwd + ["--actions", f"{d}/pickled.npy", "--chunk", "8", "--output", f"{d}/o5.mp4"],
         ["--actions", "pickled.npy", "pickled"], f"{d}/o5.mp4"),
        (fwd + ["--actions", f"{d}/complex.npy", "--chunk", "8", "--output", f"{d}/o6.mp4"],
         ["--actions", "complex64"], f"{d}/o6.mp4"),
        (fwd + ["--actions", f"{d}/strings.npy", "--chunk", "8", "--output", f"{d}/o7.mp4"],
         ["--actions", "<U1"], f"{d}/o7.mp4"),
        (g + small + ["--condition-frames", "0", "--output", f"{d}/o8.mp4"], ["--condition-frames", "--video"],
         f"{d}/o8.mp4"),
        (g + small + ["--guidance", "nan", "--output", f"{d}/o9.mp4"], ["--guidance", "finite"], f"{d}/o9.mp4"),
        (g + small + ["--fps", "inf", "--output", f"{d}/o10.mp4"], ["--fps", "finite"], f"{d}/o10.mp4"),
        (g + small + ["--output", f"{d}/a_file/o11.mp4"], ["--output", "a_file", "is a file"], f"{d}/a_file/o11.mp4"),
        (g + small + ["--output", f"{d}/o12.txt"], ["--output", "o12.txt"], f"{d}/o12.txt"),
        (g + ["--num-frames", "189", "--height", "16000", "--width", "16000", "--output", f"{d}/o13.mp4"],
         ["--height 16000 --width 16000", "would fit"], f"{d}/o13.mp4"),
        (g + ["--num-frames", "4", "--height", "64", "--width", "64", "--output", f"{d}/o14.mp4"],
         ["--num-frames must be 1 + 4k"], f"{d}/o14.mp4"),
        (g + ["--num-frames", "5", "--height", "100", "--width", "64", "--output", f"{d}/o15.mp4"],
         ["--height and --width must be"], f"{d}/o15.mp4"),
        (g + ["--action-mode", "policy", "--image", f"{d}/frame.png", "--output", f"{d}/o16.mp4"],
         ["--action-mode 'policy' needs a --domain"], f"{d}/o16.mp4"),
        (q + small + ["--output", f"{d}/o17.mp4"], ["quantized as int8", "load it with --quantize int8"],
         f"{d}/o17.mp4"),
        (q + small + ["--quantize", "fp8", "--mesh", "tensor=8", "--output", f"{d}/o18.mp4"],
         ["quantized as int8, not fp8", "use --quantize int8"], f"{d}/o18.mp4"),
        (["reason", "--model", f["int8"], "--prompt", "hi"], ["quantized as int8", "the reasoner, whose language"],
         None),
        (["export", f["int8"], f"{d}/e3"], ["quantized as int8", "(export) needs full-precision"], f"{d}/e3"),
        (["convert", m, f"{d}/c3", "--quantize", "int4"], ["--quantize 'int4'", "int8, fp8"], f"{d}/c3"),
        (["reason", "--model", m, "--prompt", "hi", "--temperature", "nan"], ["--temperature", "finite"], None),
        (["reason", "--model", m, "--prompt", "hi", "--top-p", "0"], ["--top-p"], None),
        (["reason", "--model", m, "--prompt", "hi", "--output-ids", f"{d}/a_file/ids.json"],
         ["--output-ids", "a_file"], f"{d}/a_file/ids.json"),
        (["reason", "--model", m, "--prompt", "hi", "--video", f"{d}/garbage.mp4"], ["--video", "garbage.mp4"],
         None),
        (["convert", f"{d}/nope", f"{d}/c1"], ["SRC", "nope"], f"{d}/c1"),
        (["convert", m, f"{d}/exists"], ["DST", "--overwrite"], None),
        (["convert", m, f"{d}/a_file/c2"], ["DST", "a_file"], f"{d}/a_file/c2"),
        (["export", m, f"{d}/e1", "--max-shard-size", "inf"], ["--max-shard-size", "inf"], f"{d}/e1"),
        (["export", f"{d}/nope", f"{d}/e2"], ["SRC", "nope"], f"{d}/e2"),
        (["plan", "--config", "tiny", "--mesh", "fsdp=0"], ["--mesh", "fsdp=0"], None),
        (["plan", "--config", "tiny", "--mesh", "fsdp=100000"], ["--mesh", "100,000 devices"], None),
        (["plan", "--config", "tiny", "--tokens", "0"], ["--tokens"], None),
        (["train", "--config", "tiny", "--data", f"{d}/nope", "--out", f"{d}/t1"], ["--data", "nope"], f"{d}/t1"),
        (["train", "--config", "tiny", "--data", f"{d}/exists", "--out", f"{d}/t2"], ["meta.json"], f"{d}/t2"),
        (["train", "--config", "tiny", "--data", f"{d}/exists", "--out", f"{d}/t3", "--lr", "nan"], ["--lr"],
         f"{d}/t3"),
        (["train", "--config", "tiny", "--data", f"{d}/exists", "--out", f"{d}/t4", "--mesh", "fsdp=x"],
         ["--mesh"], f"{d}/t4"),
        (["prepare", "lerobot", f"{d}/nope", f"{d}/p1", "--model", m, "--domain", "pusht"], ["nope"], f"{d}/p1"),
        (["demo", "--steps", "0"], ["--steps"], None),
        (["demo", "--out", f"{d}/a_file/demo"], ["--out", "a_file"], f"{d}/a_file/demo"),
    ]


def test_every_command_refuses_bad_input_in_one_line_leaving_nothing(files, capsys):
    for argv, words, output in _cases(files):
        code = cli.main(argv)
        captured = capsys.readouterr()
        err = captured.err.strip()
        where = shlex.join(argv)
        assert code == 2, (where, code, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (where, err)
        assert err.startswith("error: "), (where, err)
        for word in words:
            assert word in err, (where, word, err)
        if output is not None:
            assert not os.path.exists(output), where
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in files["d"].iterdir())


def _subprocess(argv, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "cosmos_jax.cli", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_no_traceback_and_no_ffmpeg_banner_from_the_real_process(files):
    d, m = files["d"], files["model"]
    for argv, word in ((["generate", "--model", m, "--prompt", "x", "--video", f"{d}/garbage.mp4", "--output",
                         "v.mp4"], "--video"),
                       (["export", m, "e", "--max-shard-size", "inf"], "--max-shard-size")):
        r = _subprocess(argv, d)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "ffmpeg version" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr


def test_convert_to_a_relative_destination(files):
    r = _subprocess(["convert", files["model"], "converted", "--no-progress"], files["d"])
    assert r.returncode == 0, r.stderr
    assert (files["d"] / "converted" / "cosmos_jax_converted.json").is_file() or any(
        (files["d"] / "converted").iterdir())


def test_symlink_loop_is_named_in_one_short_line(files, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    os.symlink(".", folder / "text_tokenizer" / "loop")
    assert cli.main(["convert", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: SRC: symlink loop: {folder}/text_tokenizer/loop points to ., a folder holding it"
    assert not (tmp_path / "out").exists()


def _parsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        yield from ((f"{name} {n}", p) for n, p in nested[0].choices.items()) if nested else [(name, command)]


def test_every_flag_has_help_and_shows_its_default():
    for name, parser in _parsers():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
    text = {name: parser.format_help() for name, parser in _parsers()}
    for name, flags in {"generate": ["--steps", "--fps", "--chunk", "--resolution-tier", "--view-point"],
                        "reason": ["--max-new-tokens", "--temperature", "--top-p", "--top-k", "--presence-penalty"],
                        "train": ["--lr", "--steps", "--batch"]}.items():
        for flag in flags:
            block = text[name].split(f"  {flag}", 1)[1].split("\n  -", 1)[0]
            assert "default" in block, (name, flag, block)
    assert "(default: 35)" in " ".join(text["generate"].split())
    assert "generation_config.json" in text["reason"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("cosmos-jax 0.")


def _examples() -> list[str]:
    return [line.strip() for line in generate_command.EPILOG.splitlines() if line.strip().startswith("cosmos-jax ")]


def test_the_generate_epilog_has_an_example_per_mode_that_parses():
    examples = _examples()
    joined = "\n".join(examples)
    for needle in ("--num-frames 1 ", "--sound", "--image frame.png --num-frames 9", "--video t2v.mp4 --condition",
                   "--action-mode policy", "--action-mode forward_dynamics", "--action-mode inverse_dynamics"):
        assert needle in joined, needle
    parser = cli.build_parser()
    for line in examples:
        parser.parse_args(shlex.split(line.replace("$M", "model"))[1:])


@pytest.mark.slow
def test_every_generate_example_runs_as_written(files, tmp_path, monkeypatch, capsys):
    """~3 min on a 2-core CPU: the eight examples, in order, in one folder, on the demo checkpoint."""
    monkeypatch.chdir(tmp_path)
    for line in _examples():
        argv = shlex.split(line.replace("$M", files["model"]))[1:] + ["--no-progress"]
        assert cli.main(argv) == 0, (line, capsys.readouterr().err)
    for name in ("frame.png", "t2v.mp4", "t2v_sound.wav", "i2v.mp4", "v2v.mp4", "policy.actions.npy", "forward.mp4",
                 "inverse.actions.json"):
        assert (tmp_path / name).is_file(), name


def _args(**overrides) -> argparse.Namespace:
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--output", "o.mp4"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_inputs_a_request_changes_are_warned(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((20, 7), np.float32))
    frames = np.zeros((9, 32, 32, 3), np.uint8)
    np.save(tmp_path / "v.npy", frames)
    generate_command.read_inputs(_args(action_mode="forward_dynamics", chunk=8, actions=str(tmp_path / "a.npy"),
                                       image=None))
    assert "warning: --actions has 20 rows but --chunk is 8: only the first 8 are used" in capsys.readouterr().err
    generate_command.read_inputs(_args(action_mode="inverse_dynamics", video=str(tmp_path / "v.npy")))
    err = capsys.readouterr().err
    assert "warning: --video has 9 frames but --chunk 16 needs 17: its last frame is repeated to make 17" in err
    generate_command.read_inputs(_args(video=str(tmp_path / "v.npy"), condition_frames=[0, 3]))
    assert "--condition-frames needs 13: its last frame is repeated" in capsys.readouterr().err


def test_v2v_latents_are_identical_from_a_frames_folder_and_its_npy(files, tmp_path, capsys):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    (tmp_path / "clip").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "clip" / f"{i:03d}.png")
    np.save(tmp_path / "clip.npy", frames)
    outputs = []
    for source in ("clip", "clip.npy"):
        outputs.append(tmp_path / f"{source}.latents.npy")
        assert cli.main(["generate", "--model", files["model"], "--prompt", "the arm moves", "--video",
                         str(tmp_path / source), "--num-frames", "9", "--height", "64", "--width", "64", "--steps",
                         "2", "--output-type", "latent", "--dtype", "float32", "--no-progress", "--output",
                         str(outputs[-1])]) == 0, capsys.readouterr().err
    a, b = (np.load(p) for p in outputs)
    assert a.shape == (1, 48, 3, 4, 4) and np.abs(a).max() > 0.1
    np.testing.assert_array_equal(a, b)


def test_reason_runs_on_the_demo_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "ids.json"
    assert cli.main(["reason", "--model", files["model"], "--prompt", "What is on the table?", "--max-new-tokens",
                     "6", "--dtype", "float32", "--output-ids", str(out)]) == 0
    record = json.loads(out.read_text())
    assert len(record["generated_ids"]) == 6 and len(record["prompt_ids"]) > 5
    assert "transformer's reasoner tower" in capsys.readouterr().err


def _poison(folder, key_part: str) -> str:
    """Set one value of the first tensor whose key contains `key_part` to NaN; returns its key."""
    from cosmos_jax.convert.safetensors_io import CheckpointIndex, write_checkpoint

    with CheckpointIndex.open(folder) as index:
        state = {k: np.array(index.read(k)) for k in index.keys()}
    config = (folder / "config.json").read_text()
    key = next(k for k in sorted(state) if key_part in k)
    state[key].reshape(-1)[0] = np.nan
    write_checkpoint(folder, state, max_shard_bytes=5 * 1024**3, overwrite=True)
    (folder / "config.json").write_text(config)
    return key


def test_nan_weights_are_warned_naming_the_tensor_while_converting(files, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    layer_key = _poison(folder / "transformer", "layers.1.")
    vae_key = _poison(folder / "vae", "decoder")
    from cosmos_jax.convert.load import NonFiniteWeightWarning

    with pytest.warns(NonFiniteWeightWarning) as record:
        assert cli.main(["convert", str(folder), str(tmp_path / "out"), "--no-progress"]) == 0
    messages = sorted(str(w.message) for w in record if w.category is NonFiniteWeightWarning)
    assert layer_key == "layers.1.input_layernorm.weight"  # layer 1 of the stacked buffer is named, not layer 0
    assert messages == [f"{folder / 'transformer'}: tensor {layer_key} holds NaN/Inf (1 of 128 values)",
                        f"{folder / 'vae'}: tensor {vae_key} holds NaN/Inf (1 of 16 values)"]


def test_a_damaged_converted_folder_names_the_tree_and_file(files, tmp_path):
    from cosmos_jax.convert.orbax_io import ConvertedCheckpointError
    from cosmos_jax.convert.load import load

    assert cli.main(["convert", files["model"], str(tmp_path / "c"), "--no-progress"]) == 0
    tree = tmp_path / "c" / "orbax" / "generator"
    for path in tree.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"garbage")
    with pytest.raises(ConvertedCheckpointError) as e:
        load(tmp_path / "c", components=("transformer",))
    message = str(e.value)
    assert message.startswith(f"{tree}: damaged orbax tree, cannot read {tree}/state/") and "\n" not in message


def test_plan_exits_1_when_it_does_not_fit_and_warns_on_a_mesh_that_shards_nothing(capfd):
    assert cli.main(["plan", "--config", "tiny", "--mesh", "fsdp=1", "--tokens", "4000000", "--text-tokens", "8",
                     "--device", "v5e-16g"]) == 1
    assert "v5e-16g: DOES NOT FIT" in capfd.readouterr().out
    assert cli.main(["plan", "--config", "tiny", "--mesh", "fsdp=3", "--tokens", "64", "--text-tokens", "8"]) == 0
    captured = capfd.readouterr()
    assert "FITS" in captured.out
    assert "warning: --mesh fsdp=3 shards almost nothing: 100.0% of the parameter bytes stay replicated" in captured.err


def test_the_work_estimate_counts_every_sample_and_the_ones_a_device_holds():
    """Four samples, two per device at once: 4x the FLOPs of one, and 2x its per-sample memory (video,
    generator activations, scores) beside one VAE decoder's scratch."""
    from cosmos_jax.config import load_preset
    from cosmos_jax.sampling import work_estimate

    sizes = dict(frames=9, height=64, width=64, latent_shape=(3, 4, 4), text_tokens=20, other_tokens=0, steps=4,
                 branches=2, decoder_width=None, dense_attention=True)
    config = load_preset("tiny")
    one = work_estimate.estimate(config, **sizes)
    four = work_estimate.estimate(config, **sizes, samples=4, samples_per_device=2)
    assert four.flops == 4 * one.flops and four.bytes == 2 * one.bytes
    assert " x 4 samples (2 per device at once): " in work_estimate.format_estimate(four, None)
    with pytest.raises(ValueError, match="samples_per_device must be in 1..4"):
        work_estimate.estimate(config, **sizes, samples=4, samples_per_device=5)


def test_work_is_estimated_before_compiling(files, capsys, monkeypatch):
    """The hostile default (189 x 720 x 1280, 35 steps) is announced with its size and a CPU time before any
    compile; the run is stopped right after the estimate."""
    class Stop(Exception):
        pass

    def stop(*_, **__):
        raise Stop

    from cosmos_jax.sampling.generate import Cosmos3Pipeline

    monkeypatch.setattr(Cosmos3Pipeline, "__call__", stop)
    with pytest.raises(Stop):
        cli.main(["generate", "--model", files["model"], "--prompt", "x", "--output", str(files["d"] / "big.mp4")])
    err = capsys.readouterr().err
    assert "text2video 189x720x1280: 44,160 video tokens" in err and "35 steps x 2 guidance branches" in err
    assert "min at this device's measured matmul rate" in err and "note: that is long on a CPU" in err

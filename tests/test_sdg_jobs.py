"""The sdg jobs file: every bad line refused before any compute, naming the line and the field; --skip-bad;
relative paths against the jobs file; and the pure pieces (selection, consistency scores). No model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cosmos_jax.sdg import consistency
from cosmos_jax.sdg.jobs import JobErrors, read_jobs
from cosmos_jax.sdg.selection import choose, slot_samples

POLICY = {"id": "p", "mode": "policy", "prompt": "pick", "image": "frame.png", "domain": "bridge_orig_lerobot",
          "chunk": 4}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "frame.png")
    np.save(tmp_path / "actions10.npy", np.zeros((4, 10), np.float32))
    np.save(tmp_path / "actions7.npy", np.zeros((4, 7), np.float32))
    return tmp_path


def _write(folder: Path, *lines: object) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _errors(path: Path) -> list[tuple[int, str | None, str]]:
    with pytest.raises(JobErrors) as info:
        read_jobs(path)
    return [(e.line, e.field, str(e)) for e in info.value.errors]


def test_relative_paths_resolve_against_the_jobs_file_and_defaults_fill_in(folder: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    path = _write(folder, "# a comment", "", POLICY, {**POLICY, "id": "q", "samples": 3})
    monkeypatch.chdir(tmp_path.parent)
    jobs, errors = read_jobs(path)
    assert errors == [] and [j.id for j in jobs] == ["p", "q"] and [j.line for j in jobs] == [3, 4]
    assert jobs[0].image == str((folder / "frame.png").resolve())
    assert (jobs[1].samples, jobs[0].chunks, jobs[0].resolved_guidance, jobs[0].camera_key) == (
        3, 1, 1.0, "observation.images.ego_view")


@pytest.mark.parametrize("bad, field, words", [
    ({**POLICY, "mode": "dance"}, "mode", "unknown mode 'dance'"),
    ({**POLICY, "image": "nowhere.png"}, "image", "file not found"),
    ({**POLICY, "mode": "forward_dynamics", "actions": "actions7.npy"}, "actions", "7 channels but domain"),
    ({**POLICY, "steps": "four"}, "steps", "must be an integer"),
    ({**POLICY, "colour": "red"}, "colour", "unknown field"),
    ({**POLICY, "domain": "mars_rover"}, "domain", "unknown embodiment domain"),
    ({**POLICY, "chunk": 6}, "chunk", "multiple of 4"),
    ({**POLICY, "mode": "text2video", "domain": None}, "image", "does not read 'image'"),
    ({**POLICY, "mode": "image2video", "chunks": 2}, "chunks", "long episodes chain"),
    ({**POLICY, "num_frames": 9}, "num_frames", "comes from chunk"),
])
def test_a_bad_line_is_refused_naming_its_line_and_field(folder: Path, bad: dict, field: str, words: str) -> None:
    bad = {k: v for k, v in bad.items() if v is not None}
    errors = _errors(_write(folder, POLICY, bad))
    assert [(line, f) for line, f, _ in errors] == [(2, field)]
    assert words in errors[0][2] and "jobs.jsonl:2" in errors[0][2]


def test_non_json_duplicates_and_width_mismatch_are_all_reported_at_once(folder: Path) -> None:
    path = _write(folder, POLICY, "{not json", {**POLICY}, [1, 2],
                  {**POLICY, "id": "r", "domain": "pusht"}, {**POLICY, "id": "s", "fps": 10})
    errors = _errors(path)
    assert [(line, field) for line, field, _ in errors] == [(2, None), (3, "id"), (4, None), (5, "domain"),
                                                            (6, "fps")]
    text = [e for _, _, e in errors]
    assert "not valid JSON" in text[0] and "duplicate id 'p' (first on line 1)" in text[1]
    assert "a job is a JSON object" in text[2] and "2 action channels" in text[3] and "one fps" in text[4]


def test_skip_bad_keeps_the_good_lines_and_returns_the_bad(folder: Path) -> None:
    path = _write(folder, POLICY, {**POLICY, "id": "x", "mode": "dance"}, {**POLICY, "id": "y"})
    jobs, errors = read_jobs(path, skip_bad=True)
    assert [j.id for j in jobs] == ["p", "y"] and [(e.line, e.field) for e in errors] == [(2, "mode")]
    with pytest.raises(JobErrors, match="jobs.jsonl:1: field 'mode'"):
        read_jobs(_write(folder, {**POLICY, "mode": "dance"}), skip_bad=True)


def test_mixing_labelled_and_unlabelled_jobs_is_refused(folder: Path) -> None:
    t2v = {"id": "t", "mode": "text2video", "prompt": "a scene", "num_frames": 5, "height": 32, "width": 32}
    errors = _errors(_write(folder, POLICY, t2v))
    assert [(line, field) for line, field, _ in errors] == [(2, "domain")]


def test_best_of_keeps_the_highest_score_and_min_consistency_drops_the_slot() -> None:
    assert slot_samples(2, 3) == [6, 7, 8]
    choice = choose([(6, 0.5), (7, 0.9), (8, 0.9)], None)
    assert choice.kept == 7 and choice.rejected == ((6, "best_of"), (8, "best_of"))
    choice = choose([(6, 0.5), (7, 0.6)], 0.7)
    assert choice.kept is None and choice.rejected == ((6, "best_of"), (7, "min_consistency"))
    assert choose([(0, None), (1, 0.1)], None).kept == 1


def test_consistency_errors_and_scores() -> None:
    actions = np.array([[0.0, 1.0], [0.5, -1.0], [1.0, 0.0]], np.float32)
    overall, per_channel = consistency.action_nmse(actions + np.array([0.1, 0.2], np.float32), actions)
    np.testing.assert_allclose(per_channel, [0.01, 0.04], rtol=1e-5)
    np.testing.assert_allclose(overall, 0.025, rtol=1e-5)
    latents = np.zeros((1, 2, 3, 2, 2), np.float32)
    other = latents.copy()
    other[:, :, 0] = 5.0  # the given first frame does not count
    other[:, 0, 1:] = 1.0
    assert consistency.latent_mse(other, latents) == pytest.approx(0.5)
    assert consistency.score(0.0) == 1.0 and consistency.score(1.0) == pytest.approx(np.exp(-1))
    with pytest.raises(ValueError, match="must be the same"):
        consistency.action_nmse(actions[:2], actions)


def test_the_command_prints_every_bad_line_and_exits_2_before_loading(folder: Path, tmp_path: Path,
                                                                       capsys) -> None:
    from cosmos_jax.cli import main

    path = _write(folder, POLICY, "{oops", {**POLICY, "id": "q", "mode": "dance"})
    model = tmp_path / "no-weights"
    model.mkdir()
    out = tmp_path / "dataset"
    assert main(["sdg", "--model", str(model), "--jobs", str(path), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and "jobs.jsonl:2: not valid JSON" in lines[0]
    assert "jobs.jsonl:3: field 'mode'" in lines[1]
    assert not out.exists() and not (tmp_path / "dataset.sdg-work").exists()

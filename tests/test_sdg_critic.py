"""`cosmos-jax sdg --critic`: the answer parser on real strings, and the critic inside sdg runs.

The model is the embedded demo checkpoint plus root reasoner files holding a tiny random vision encoder (the
language tower stays the transformer's, the published "vision only" root layout), so the reasoner can watch a
clip. Its weights are random: its answers are nonsense, and what is pinned is the plumbing: the stored answer is
token for token what `cosmos-jax reason`'s prompt and the library's greedy `reason.generate` give for the same
frames and question, and the stored score is `parse_score` of the stored answer. A deterministic answer function
injected through `run_sdg(critic=...)` then pins where the scores land (episode columns, episodes.jsonl,
report.json) with --best-of 2, that the critic leaves the episodes as they are, that a resumed run equals an
uninterrupted one critic columns included, and that a resume toggling --critic is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cosmos_jax.sdg.critic import QUESTION, parse_score

TEXT_CONFIG = dict(  # the demo transformer's reasoner tower (configs/tiny.json) as a reasoner text_config
    vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5]},
)
VISION_CONFIG = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                     spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=36,
                     deepstack_visual_indexes=[0])
TOKEN_IDS = dict(image_token_id=518, video_token_id=519, vision_start_token_id=515, vision_end_token_id=516)

ANSWERS = [  # (a reasoner's answer, the score it must give)
    ("4", 4),
    ("Score: 5.", 5),
    ("I'd rate it 3/5", 3),
    ("4 out of 5", 4),
    ("4 (out of 5)", 4),
    ("I give it a 3 (out of 5).", 3),
    ("2 (/5)", 2),
    ("4 (out of 5", None),  # an unclosed bracket is not a fraction: "4" and "5" are two numbers
    ("4 (out of 50)", None),
    ("5/5", 5),
    ("Rating:\n2\n", 2),
    ("Score: 4. Final answer: 4", 4),
    ("The answer is 1!", 1),
    ("", None),
    ("plausible", None),
    ("2 or 3", None),
    ("between 2 and 4", None),
    ("On a scale of 1 to 5, I give it a 4.", None),
    ("7", None),
    ("10", None),
    ("0", None),
    ("-3", None),
    ("3.5", None),
    ("3/10", None),
    ("4th", None),
    ("\uff14", None),  # a full-width 4 is not an ASCII digit
]


@pytest.mark.parametrize("answer,score", ANSWERS)
def test_parse_score_reads_one_unambiguous_1_to_5(answer: str, score: int | None) -> None:
    assert parse_score(answer) == score


def add_vision_reasoner(folder: Path) -> Path:
    """Root reasoner files beside the demo checkpoint's transformer/: config.json with a vision_config, the random
    ViT in model.safetensors, a video processor config that keeps 32x32 frames at their size."""
    import jax
    import jax.numpy as jnp
    import safetensors.numpy

    from cosmos_jax.convert.keymap_reasoner import VISION, iter_state
    from cosmos_jax.modeling.reasoner import Reasoner, ReasonerConfig

    raw = {"model_type": "cosmos3_omni", "text_config": TEXT_CONFIG, "vision_config": VISION_CONFIG, **TOKEN_IDS}
    config = ReasonerConfig.from_dict(raw)
    vision = Reasoner(config, dtype=jnp.float32).vision.init(jax.random.key(7))
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in iter_state({"vision": vision}, config, (VISION,))}
    safetensors.numpy.save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"shortest_edge": 4096, "longest_edge": 16384}}))
    return folder


def _jobs(folder: Path, samples: int) -> Path:
    from cosmos_jax.demo import demo_image

    folder.mkdir(parents=True, exist_ok=True)
    demo_image(32, 32).save(folder / "frame.png")
    job = {"id": "pol", "mode": "policy", "prompt": "pick", "chunk": 4, "seed": 0, "samples": samples,
           "image": "frame.png", "domain": "bridge_orig_lerobot", "resolution_tier": 256, "steps": 2, "fps": 8}
    path = folder / "jobs.jsonl"
    path.write_text(json.dumps(job) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import jax.numpy as jnp

    from cosmos_jax.demo import build_demo_checkpoint
    from cosmos_jax.sampling.generate import Cosmos3Pipeline

    root = tmp_path_factory.mktemp("sdg_critic")
    demo = build_demo_checkpoint(root / "demo")
    checkpoint = add_vision_reasoner(Path(shutil.copytree(demo, root / "checkpoint")))
    pipeline = Cosmos3Pipeline.from_pretrained(checkpoint, dtype=jnp.float32, attention="xla")
    return {"root": root, "demo": demo, "checkpoint": checkpoint, "pipeline": pipeline,
            "jobs": _jobs(root / "jobs", samples=1)}


def _run(world, out: Path, answerer=None, **settings):
    from cosmos_jax.sdg.engine import Settings
    from cosmos_jax.sdg.run import run_sdg

    return run_sdg(world["checkpoint"], settings.pop("jobs", world["jobs"]), out, Settings(**settings),
                   pipeline=world["pipeline"], progress=False, say=lambda m: None, critic=answerer)


def _rows(out: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pydict()


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "meta/cosmos_sdg/episodes.jsonl").read_text().splitlines()]


def _report(out: Path) -> dict:
    return json.loads((out / "meta/cosmos_sdg/report.json").read_text())


def _capture(monkeypatch) -> list:
    """Every candidate journaled from now on (its frames as generated, before the mp4 encoding)."""
    from cosmos_jax.sdg import journal as journal_lib

    made = []
    write = journal_lib.Journal.write
    monkeypatch.setattr(journal_lib.Journal, "write", lambda self, c: (made.append(c), write(self, c))[1])
    return made


def _reason_answer(checkpoint: Path, frames: np.ndarray, fps: float, tmp: Path) -> tuple[list[int], str]:
    """What `cosmos-jax reason --video clip.npy --source-fps FPS --prompt QUESTION` builds, decoded greedily for
    16 new tokens by the library's `reason.generate`, with the reasoner `load` reads from the folder."""
    import jax.numpy as jnp

    from cosmos_jax.commands import reason as reason_command
    from cosmos_jax.convert.load import load
    from cosmos_jax.reasoner_inputs import batch_prompts
    from cosmos_jax.sampling import reason
    from cosmos_jax.sampling.reasoner_folder import chat_tokenizer, pad_id

    np.save(tmp / "clip.npy", frames)
    args = argparse.Namespace(model=str(checkpoint), prompt=QUESTION, image=[], video=str(tmp / "clip.npy"),
                              video_fps=2.0, source_fps=fps, system=None)
    tokenizer = chat_tokenizer(checkpoint)
    loaded = load(checkpoint, dtype=jnp.float32, components=("reasoner",)).reasoner
    prompt = reason_command.build_prompt(args, tokenizer, loaded.config)
    assert prompt.token_types.count(2) == 2 * 16  # 4 sampled frames: 2 temporal patches of (32/8)² tokens
    pad = pad_id(tokenizer)
    tokens, lengths = reason.generate(loaded.model(), loaded.params, batch_prompts([prompt], loaded.config, pad),
                                      max_new_tokens=16, eos_ids=(tokenizer.eos_token_id,), pad_id=pad)
    ids = [int(t) for t in tokens[0, : int(lengths[0])]]
    return ids, tokenizer.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.slow  # one tiny-demo sdg run or more: a minute or two on a loaded 2-core CPU
def test_the_reasoner_critic_stores_what_reason_answers_about_the_frames(world, tmp_path, monkeypatch):
    import jax.numpy as jnp

    from cosmos_jax.sdg.critic import pipeline_critic

    made = _capture(monkeypatch)
    out = tmp_path / "critic"
    report = _run(world, out, critic=True)
    assert len(made) == 1
    answer = made[0].record["critic_answer"]
    ids, text = _reason_answer(world["checkpoint"], made[0].frames, 8.0, tmp_path)
    assert answer == text
    critic = pipeline_critic(world["pipeline"], world["checkpoint"], jnp.float32)
    assert critic.params["layers"] is world["pipeline"].params["reasoner"]["layers"]  # the tower is shared
    assert critic.answer_ids(made[0].frames, 8.0) == ids and 1 <= len(ids) <= 16
    score = parse_score(answer)
    rows, lines = _rows(out), _lines(out)
    assert rows["cosmos_sdg/critic_answer"] == [answer] and rows["cosmos_sdg/critic_score"] == [score]
    assert (lines[0]["critic_answer"], lines[0]["critic_score"]) == (answer, score)
    assert 0 < rows["cosmos_sdg/consistency"][0] <= 1  # beside the consistency score
    counts = {**{str(s): int(score == s) for s in range(1, 6)}, "missing": int(score is None)}
    assert report["critic"] == {"question": QUESTION, "sample_fps": 2.0, "max_new_tokens": 16,
                                "decoding": "greedy", "kept": counts, "candidates": counts}
    assert _report(out)["critic"] == report["critic"]


TABLE = [("4", 4), ("Score: 2.", 2), ("2 or 3", None), ("I'd rate it 5/5", 5)]


def _answer(frames: np.ndarray, fps: float) -> str:
    """A deterministic stand-in for the reasoner: one of TABLE's answers, chosen by the frames' content."""
    return TABLE[_entry(frames)][0]


def _entry(frames: np.ndarray) -> int:
    return int(np.asarray(frames, np.int64).sum()) % len(TABLE)


def _without_critic(root: Path) -> dict:
    """The dataset's contents (test_sdg.contents) with the critic's columns, lines and run settings left out."""
    from test_sdg import contents

    out = {}
    for key, value in contents(root).items():
        if key.endswith("run.json"):
            continue
        if key.startswith("meta/episodes/"):
            value = {k: v for k, v in value.items() if not k.startswith("cosmos_sdg/critic_")}
        elif key.endswith("episodes.jsonl"):
            value = [{k: v for k, v in json.loads(line).items() if not k.startswith("critic_")}
                     for line in value.splitlines()]
        out[key] = value
    return out


def _interrupt_after(monkeypatch, count: int, **kwargs) -> None:
    """Run with the journal failing after `count` candidates (a kill between two candidates), then restore it."""
    from cosmos_jax.sdg import journal as journal_lib

    write = journal_lib.Journal.write
    calls = {"n": 0}

    def dying_write(self, candidate):
        if calls["n"] == count:
            raise KeyboardInterrupt
        calls["n"] += 1
        write(self, candidate)

    monkeypatch.setattr(journal_lib.Journal, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(**kwargs)
    monkeypatch.setattr(journal_lib.Journal, "write", write)


@pytest.mark.slow  # one tiny-demo sdg run or more: a minute or two on a loaded 2-core CPU
def test_scores_land_in_the_columns_jsonl_and_report_and_leave_the_episodes_alone(world, tmp_path, monkeypatch):
    jobs = _jobs(tmp_path / "jobs", samples=2)
    settings = dict(jobs=jobs, best_of=2, batch_size=1)
    made = _capture(monkeypatch)
    report = _run(world, tmp_path / "critic", _answer, critic=True, **settings)
    monkeypatch.undo()
    scores = {c.sample_index: TABLE[_entry(c.frames)][1] for c in made}
    assert sorted(scores) == [0, 1, 2, 3] and any(s is not None for s in scores.values())
    for c in made:
        assert (c.record["critic_answer"], c.record["critic_score"]) == TABLE[_entry(c.frames)]
    rows, lines = _rows(tmp_path / "critic"), _lines(tmp_path / "critic")
    kept = rows["cosmos_sdg/sample_index"]
    assert [k // 2 for k in kept] == [0, 1]  # one candidate of each slot
    assert rows["cosmos_sdg/critic_score"] == [scores[k] for k in kept]
    assert rows["cosmos_sdg/critic_answer"] == [TABLE[_entry(c.frames)][0] for k in kept for c in made
                                                if c.sample_index == k]
    assert [line["critic_score"] for line in lines] == [scores[k] for k in kept]

    def counts(values):
        return {**{str(s): sum(v == s for v in values) for s in range(1, 6)},
                "missing": sum(v is None for v in values)}

    assert report["critic"]["kept"] == counts([scores[k] for k in kept])
    assert report["critic"]["candidates"] == counts(scores.values())
    assert report["critic_seconds"] >= 0 and report["candidates"] == 4 and report["episodes"] == 2

    plain = tmp_path / "plain"  # the same run without the critic, resumed after a kill
    _interrupt_after(monkeypatch, 1, world=world, out=plain, **settings)
    with pytest.raises(ValueError, match="--critic False != True"):
        _run(world, plain, _answer, critic=True, **settings)
    _run(world, plain, **settings)
    assert "cosmos_sdg/critic_score" not in _rows(plain) and _report(plain)["critic"] is None
    with_critic, without = _without_critic(tmp_path / "critic"), _without_critic(plain)
    assert sorted(with_critic) == sorted(without)
    for key, value in with_critic.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, without[key], err_msg=key)
        else:
            assert value == without[key], key
    with pytest.raises(ValueError, match="--critic True != False"):  # a finished critic dataset, rerun without
        _run(world, tmp_path / "critic", **settings)


@pytest.mark.slow  # one tiny-demo sdg run or more: a minute or two on a loaded 2-core CPU
def test_a_resumed_critic_run_equals_an_uninterrupted_one(world, tmp_path, monkeypatch):
    from test_sdg import assert_same_dataset

    jobs = _jobs(tmp_path / "jobs", samples=2)
    settings = dict(jobs=jobs, best_of=2, batch_size=1, critic=True)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(world, whole, _answer, **settings)
    _interrupt_after(monkeypatch, 2, world=world, out=resumed, answerer=_answer, **settings)
    with pytest.raises(ValueError, match="--critic True != False"):
        _run(world, resumed, **{**settings, "critic": False})
    asked = []
    _run(world, resumed, lambda frames, fps: (asked.append(fps), _answer(frames, fps))[1], **settings)
    assert len(asked) == 2  # the two journaled candidates are not asked again
    assert_same_dataset(whole, resumed, exact=True)
    assert [line["critic_answer"] for line in _lines(whole)] == [line["critic_answer"] for line in _lines(resumed)]


def test_critic_on_a_model_without_a_vision_encoder_is_refused_before_loading(world, tmp_path, capsys):
    from cosmos_jax import cli

    code = cli.main(["sdg", "--model", str(world["demo"]), "--jobs", str(world["jobs"]), "--out",
                     str(tmp_path / "out"), "--critic", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --critic needs the reasoner's vision encoder, and {world['demo']} has no root reasoner files "
        "with one (config.json with a vision_config + model*.safetensors)"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.sdg-work").exists()

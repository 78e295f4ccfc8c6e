"""The sdg consistency score separates right from wrong actions once the model has learnt dynamics.

A tiny model trained briefly on the pushed-disc world (tools/synthetic_world.py: forward and inverse tasks,
STEPS steps) reads each held-out clip back by inverse dynamics (its one-step posterior-mean estimate), and
`cosmos_jax.sdg.consistency` scores the clip's exact pushes, the pushes of another clip (shuffled) and
uniform noise pushes against that read-back. The exact pushes must score best on average and on most clips.
Slow: 400 training steps, 11-14 minutes on a loaded 2-core CPU (observed: mean score 0.746 exact, 0.674
shuffled, 0.661 noise; exact wins on 65% and 73% of the 48 clips).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.sdg import consistency
from cosmos_jax.training import data as data_lib
from cosmos_jax.training.loop import RunConfig, train
from cosmos_jax.training.losses import LossConfig
from cosmos_jax.training.step import OptimConfig, compute_params

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "synthetic_world.py")
_SPEC = importlib.util.spec_from_file_location("synthetic_world_sdg", _PATH)
world = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = world
_SPEC.loader.exec_module(world)

STEPS, BATCH, TRAIN_CLIPS, EVAL_CLIPS, SHIFT = 400, 16, 512, 48, 3.0
MARGIN, MOST = 0.03, 0.6  # exact beats each wrong kind by MARGIN on average and on >= MOST of the clips


@pytest.mark.slow
def test_exact_actions_score_better_than_shuffled_or_noise_on_a_trained_model(tmp_path):
    train_root, eval_root = str(tmp_path / "train"), str(tmp_path / "eval")
    meta = world.write_world(train_root, TRAIN_CLIPS, seed=0)
    world.write_world(eval_root, EVAL_CLIPS, seed=10_000)
    cfg = Cosmos3Config(**world.MODEL)
    cfg.to_json(str(tmp_path / "model.json"))
    run = RunConfig(model=str(tmp_path / "model.json"), data=train_root, out=str(tmp_path / "run"), steps=STEPS,
                    batch=BATCH, max_text_len=world.TEXT_LEN, seed=0, dtype="float32", attention="xla",
                    mesh=f"fsdp={jax.device_count()}", save_every=STEPS, keep=1, task_weights={"forward": 1.0, "inverse": 1.0},
                    optim=OptimConfig(lr=1e-3, warmup_steps=STEPS // 5, total_steps=STEPS, weight_decay=0.0,
                                      freeze_reasoner=False),
                    loss=LossConfig(vision_weight=1.0, action_weight=1.0, schedule="waver", shift=SHIFT))
    result = train(run, progress=False)
    model, params = result["model"], compute_params(result["state"].params, result["model"].dtype)
    samples = [data_lib.load_sample({"id": e["id"], "path": os.path.join(eval_root, e["file"])}, meta, cfg,
                                    world.TEXT_LEN) for e in data_lib.read_index(eval_root)]
    rows = [data_lib.pack_sample(s, meta, cfg, world.TEXT_LEN, "inverse") for s in samples]
    batch = data_lib.to_train_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    _, action = jax.jit(lambda p, t, g, k: world.euler_sample(model, p, t, g, k, 1, SHIFT))(
        params, batch.text, batch.gen, jax.random.key(0))
    exact = np.stack([s["actions"] for s in samples])
    recovered = np.asarray(action)[..., : exact.shape[-1]]
    wrong = {"shuffled": np.roll(exact, 1, axis=0),
             "noise": np.random.default_rng(1).uniform(-1, 1, exact.shape).astype(np.float32)}
    scores = {"exact": np.array([consistency.score(consistency.action_nmse(r, a)[0])
                                 for r, a in zip(recovered, exact)])}
    for name, actions in wrong.items():
        scores[name] = np.array([consistency.score(consistency.action_nmse(r, a)[0])
                                 for r, a in zip(recovered, actions)])
    print({k: round(float(v.mean()), 4) for k, v in scores.items()},
          {k: round(float(np.mean(scores["exact"] > scores[k])), 3) for k in wrong})
    for name in wrong:
        assert scores["exact"].mean() > scores[name].mean() + MARGIN, name
        assert np.mean(scores["exact"] > scores[name]) >= MOST, name

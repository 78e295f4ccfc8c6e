"""A 2D pushed-disc world to show the training loop learns dynamics, on CPU in minutes.

Scene: a coloured disc on a 32×32 RGB canvas; each step a 2D push a ∈ [−1, 1]² moves it by PUSH·a pixels
(clamped at the walls). A clip is FRAMES frames and FRAMES−1 pushes. "Latents" are the raw pixels scaled to
[−1, 1] with each 4×4 RGB patch folded into 48 channels (a fixed, invertible stand-in for the VAE):
[32, 32, 3] -> [48, 8, 8], so the model sees latent_shape (48, FRAMES, 8, 8).

    python tools/synthetic_world.py experiment --out /tmp/world --steps 300

trains a small model with `cosmos_jax.training.loop.train` and evaluates on held-out clips:
  forward dynamics  (frame 0 + pushes given -> frames 1..)  MSE vs copying the last given frame;
  inverse dynamics  (all frames given -> pushes)            MSE vs predicting the training-mean push.
Samples are drawn with an Euler flow sampler over σ from 1 to 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.inputs import GeneratorInputs, TextInputs
from cosmos_jax.training import data as data_lib
from cosmos_jax.training.loop import RunConfig, train
from cosmos_jax.training.losses import LossConfig, shift_sigma
from cosmos_jax.training.step import OptimConfig, compute_params

SIZE, PATCH, FRAMES, RADIUS, PUSH = 32, 4, 4, 4, 4.0
CAPTION = np.array([5, 17, 42], np.int32)  # "push the disc" in the tiny vocabulary
# hidden_size >= patch_latent_dim (192), so a token can carry its whole noisy 2×2×48 patch (a narrower model
# cannot reproduce the noise and its velocity error stays near Var(ε)).
MODEL = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
    head_dim=32, rope_axes_dim=[6, 5, 5], vocab_size=64, action_gen=True, action_dim=8, num_embodiment_domains=2,
    sound_gen=False, latent_channel=48, latent_patch_size=2, patch_latent_dim=192,
)


def render(position: np.ndarray, color: np.ndarray) -> np.ndarray:
    """[SIZE, SIZE, 3] float in [0, 1]: an anti-aliased disc at `position` (x, y) on black."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dist = np.hypot(xx - position[0], yy - position[1])
    alpha = np.clip(RADIUS + 0.5 - dist, 0.0, 1.0)
    return alpha[..., None] * color[None, None, :]


def rollout(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """frames [FRAMES, SIZE, SIZE, 3] in [0, 1] and pushes [FRAMES − 1, 2] in [−1, 1]."""
    lo, hi = RADIUS, SIZE - RADIUS
    position = rng.uniform(lo + 4, hi - 4, size=2)
    color = rng.uniform(0.4, 1.0, size=3)
    pushes = rng.uniform(-1.0, 1.0, size=(FRAMES - 1, 2))
    frames = [render(position, color)]
    for push in pushes:
        position = np.clip(position + PUSH * push, lo, hi)
        frames.append(render(position, color))
    return np.stack(frames), pushes.astype(np.float32)


def to_latents(frames: np.ndarray) -> np.ndarray:
    """[T, SIZE, SIZE, 3] in [0, 1] -> [48, T, SIZE/4, SIZE/4] in [−1, 1] (4×4 patches folded into channels)."""
    t = frames.shape[0]
    g = SIZE // PATCH
    x = frames.reshape(t, g, PATCH, g, PATCH, 3).transpose(2, 4, 5, 0, 1, 3).reshape(PATCH * PATCH * 3, t, g, g)
    return (x * 2.0 - 1.0).astype(np.float32)


def from_latents(latents: np.ndarray) -> np.ndarray:
    """Inverse of to_latents."""
    c, t, g, _ = latents.shape
    x = latents.reshape(PATCH, PATCH, 3, t, g, g).transpose(3, 4, 0, 5, 1, 2).reshape(t, SIZE, SIZE, 3)
    return (x + 1.0) / 2.0


def write_world(root: str, count: int, seed: int) -> data_lib.DatasetMeta:
    """`count` clips in the training data format under root."""
    rng = np.random.default_rng(seed)
    meta = data_lib.DatasetMeta((48, FRAMES, SIZE // PATCH, SIZE // PATCH), fps=8.0, action_chunk=FRAMES - 1,
                                action_width=2)
    entries = []
    for i in range(count):
        frames, pushes = rollout(rng)
        entries.append(data_lib.write_sample(root, f"clip{i:05d}", to_latents(frames), CAPTION, pushes, domain=1))
    data_lib.write_dataset(root, meta, entries)
    return meta


def euler_sample(model, params, text: TextInputs, gen: GeneratorInputs, key: jax.Array, steps: int, shift: float):
    """Integrate dx/dσ = v from σ = 1 (noise) to 0 on the noisy frames/rows; clean ones stay as given."""
    t = shift_sigma(jnp.linspace(1.0, 0.0, steps + 1), shift)
    kv, ka = jax.random.split(key)
    v_mask = gen.vision_noisy[:, None, :, None, None]
    a_mask = gen.action_noisy[..., None]
    vision = jnp.where(v_mask, jax.random.normal(kv, gen.vision.shape), gen.vision)
    action = jnp.where(a_mask, jax.random.normal(ka, gen.action.shape), gen.action)
    for i in range(steps):
        sigma = jnp.full(gen.vision.shape[:1], t[i])
        out = model(params, text, gen.replace(vision=vision, action=action, vision_t=sigma * 1000.0,
                                              action_t=sigma * 1000.0))
        dt = t[i + 1] - t[i]
        vision = jnp.where(v_mask, vision + dt * out.vision.astype(jnp.float32), vision)
        action = jnp.where(a_mask, action + dt * out.action.astype(jnp.float32), action)
    return vision, action


def evaluate(model, params, root: str, meta: data_lib.DatasetMeta, cfg: Cosmos3Config, train_mean: np.ndarray,
             steps: int, shift: float, seed: int) -> dict[str, float]:
    """Forward and inverse dynamics MSE on all clips under root, against the two baselines. steps=1 is the
    one-step prediction x̂0 = ε − v(ε, σ=1), the model's posterior-mean estimate."""
    samples = [data_lib.load_sample({"id": e["id"], "path": os.path.join(root, e["file"])}, meta, cfg, 8)
               for e in data_lib.read_index(root)]
    sample_fn = jax.jit(lambda p, text, gen, key: euler_sample(model, p, text, gen, key, steps, shift))
    results = {}
    for task in ("forward", "inverse"):
        rows = [data_lib.pack_sample(s, meta, cfg, 8, task) for s in samples]
        batch = data_lib.to_train_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
        vision, action = sample_fn(params, batch.text, batch.gen, jax.random.key(seed))
        truth_frames = np.stack([from_latents(s["latents"]) for s in samples])
        if task == "forward":
            predicted = np.stack([from_latents(np.asarray(v)) for v in vision])
            copy_last = np.repeat(truth_frames[:, :1], FRAMES, axis=1)
            results["forward_mse"] = float(np.mean((predicted[:, 1:] - truth_frames[:, 1:]) ** 2))
            copy_err = (copy_last[:, 1:] - truth_frames[:, 1:]) ** 2
            results["forward_baseline_copy_last_frame_mse"] = float(np.mean(copy_err))
        else:
            truth = np.stack([s["actions"] for s in samples])
            predicted = np.asarray(action)[..., :2]
            results["inverse_mse"] = float(np.mean((predicted - truth) ** 2))
            results["inverse_baseline_mean_action_mse"] = float(np.mean((train_mean - truth) ** 2))
    return results


def experiment(out: str, steps: int, batch: int, train_clips: int, eval_clips: int, lr: float) -> dict[str, float]:
    train_root, eval_root = os.path.join(out, "train_data"), os.path.join(out, "eval_data")
    os.makedirs(out, exist_ok=True)
    meta = write_world(train_root, train_clips, seed=0)
    write_world(eval_root, eval_clips, seed=1)
    cfg = Cosmos3Config(**MODEL)
    config_path = os.path.join(out, "model_config.json")
    cfg.to_json(config_path)
    train_mean = np.mean([np.load(os.path.join(train_root, e["file"]))["actions"]
                          for e in data_lib.read_index(train_root)], axis=0).mean(axis=0)
    loss = LossConfig(vision_weight=1.0, action_weight=1.0, schedule="waver", shift=3.0)  # the 256-px defaults
    run = RunConfig(model=config_path, data=train_root, out=os.path.join(out, "run"), steps=steps, batch=batch,
                    max_text_len=8, dtype="float32", mesh="fsdp=1", save_every=steps, keep=1,
                    task_weights={"forward": 1.0, "inverse": 1.0, "joint": 0.5, "policy": 0.5},
                    optim=OptimConfig(lr=lr, warmup_steps=min(50, steps // 5), total_steps=steps, weight_decay=0.0,
                                      freeze_reasoner=False),
                    loss=loss)
    start = time.perf_counter()
    result = train(run)
    train_seconds = time.perf_counter() - start
    model = result["model"]
    params = compute_params(result["state"].params, model.dtype)
    metrics = {}
    for sampler_steps in (1, 10):
        found = evaluate(model, params, eval_root, meta, cfg, train_mean, steps=sampler_steps, shift=loss.shift,
                         seed=0)
        metrics.update({f"{k}@{sampler_steps}step" if "baseline" not in k else k: v for k, v in found.items()})
    metrics.update(train_seconds=train_seconds, steps=steps, batch=batch, final_loss=result["metrics"]["loss/total"])
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write a dataset of clips")
    make.add_argument("--out", required=True)
    make.add_argument("--clips", type=int, default=512)
    make.add_argument("--seed", type=int, default=0)
    exp = sub.add_parser("experiment", help="train a small model on CPU and evaluate against the baselines")
    exp.add_argument("--out", required=True)
    exp.add_argument("--steps", type=int, default=300)
    exp.add_argument("--batch", type=int, default=16)
    exp.add_argument("--train-clips", type=int, default=2048)
    exp.add_argument("--eval-clips", type=int, default=64)
    exp.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    if args.command == "make":
        write_world(args.out, args.clips, args.seed)
    else:
        print(json.dumps(experiment(args.out, args.steps, args.batch, args.train_clips, args.eval_clips, args.lr),
                         indent=1))


if __name__ == "__main__":
    main()

"""A 2D pushed-disc world to show the training loop learns dynamics, on CPU in minutes.

Scene: a grey disc (brightness in [0.4, 1]) on a 16×16 black canvas; each step a 2D push a ∈ [−1, 1]² moves it
by PUSH·M·a pixels (clamped at the walls), M the action regime's control matrix: regime "A" the identity (a push
along x moves the disc along x), regime "B" a quarter turn (the same push moves it along y; one along y moves it
along −x). A clip is FRAMES frames and FRAMES−1 pushes. "Latents" are the raw pixels scaled to [−1, 1] with each
2×2 patch folded into 4 channels (a fixed, invertible stand-in for the VAE): [16, 16, 1] -> [4, 8, 8], so the model
sees latent_shape (4, FRAMES, 8, 8) and tokens of 2×2 latent patches.

    python tools/synthetic_world.py experiment --out /tmp/world

trains MODEL with `cosmos_jax.training.loop.train` on the forward and inverse tasks and evaluates on held-out
clips (mean ± standard error over clips):
  forward dynamics  (frame 0 + pushes given -> frames 1..)  pixel MSE vs copying the last given frame;
  inverse dynamics  (all frames given -> pushes)            MSE vs predicting the training-mean push.
Samples are drawn with an Euler flow sampler over σ from 1 to 0 (1 step: the posterior-mean estimate).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.inputs import GeneratorInputs, GeneratorOutputs, TextInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.training import data as data_lib
from cosmos_jax.training.loop import RunConfig, train
from cosmos_jax.training.lora import LoraConfig
from cosmos_jax.training.losses import TIMESTEP_SCALE, LossConfig, shift_sigma
from cosmos_jax.training.step import OptimConfig, compute_params

SIZE, PATCH, FRAMES, RADIUS, PUSH, CHANNELS = 16, 2, 4, 2.5, 2.0, 1
LATENT_CHANNELS = PATCH * PATCH * CHANNELS
TEXT_LEN = 8
CAPTION = np.array([5, 17, 42], np.int32)  # "push the disc" in the tiny vocabulary
# Two choices matter at this scale. (1) rope_theta: at the released 5e6 the rotary frequencies of the spatial
# axes are <= 0.38 rad per token, so on a 4×4 token grid attention cannot tell positions apart and the model
# cannot locate the disc (inverse dynamics stayed at the mean-action error); 10 gives 0.15-0.87 rad per token.
# (2) few latent dims per token (16) against the width (128): the network must carry ε through to predict
# v = ε − x0, which a 192-dim RGB patch in a 256-wide model did not learn in the CPU budget.
MODEL = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "rope_axes_dim": [6, 5, 5], "rope_theta": 10.0, "vocab_size": 64,
    "action_gen": True, "action_dim": 8, "num_embodiment_domains": 2, "sound_gen": False,
    "latent_channel": LATENT_CHANNELS, "latent_patch_size": 2, "patch_latent_dim": 4 * LATENT_CHANNELS,
}
# The action regimes: displacement = PUSH · CONTROLS[regime] @ a. Both keep each component of M·a in [−1, 1].
CONTROLS = {
    "A": np.eye(2),
    "B": np.array([[0.0, -1.0], [1.0, 0.0]]),
}


def render(position: np.ndarray, color: np.ndarray) -> np.ndarray:
    """[SIZE, SIZE, CHANNELS] float in [0, 1]: an anti-aliased disc of `color` at `position` (x, y) on black."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dist = np.hypot(xx - position[0], yy - position[1])
    alpha = np.clip(RADIUS + 0.5 - dist, 0.0, 1.0)
    return alpha[..., None] * color[None, None, :]


def displacement(push: np.ndarray, regime: str) -> np.ndarray:
    """[..., 2] pushes -> [..., 2] pixel displacements before the walls, PUSH · CONTROLS[regime] @ push."""
    if regime not in CONTROLS:
        raise ValueError(f"unknown action regime {regime!r}; choose one of {sorted(CONTROLS)}")
    return PUSH * (push @ CONTROLS[regime].T)


def rollout(rng: np.random.Generator, regime: str = "A") -> tuple[np.ndarray, np.ndarray]:
    """frames [FRAMES, SIZE, SIZE, CHANNELS] in [0, 1] and pushes [FRAMES − 1, 2] in [−1, 1]; the disc moves by
    `displacement(push, regime)`. The random draws do not depend on the regime."""
    lo, hi = RADIUS, SIZE - RADIUS
    position = rng.uniform(lo + PUSH, hi - PUSH, size=2)
    color = rng.uniform(0.4, 1.0, size=CHANNELS)
    pushes = rng.uniform(-1.0, 1.0, size=(FRAMES - 1, 2))
    frames = [render(position, color)]
    for push in pushes:
        position = np.clip(position + displacement(push, regime), lo, hi)
        frames.append(render(position, color))
    return np.stack(frames), pushes.astype(np.float32)


def to_latents(frames: np.ndarray) -> np.ndarray:
    """[T, SIZE, SIZE, CHANNELS] in [0, 1] -> [LATENT_CHANNELS, T, SIZE/PATCH, SIZE/PATCH] in [−1, 1] (PATCH×PATCH
    patches folded into channels)."""
    t = frames.shape[0]
    g = SIZE // PATCH
    x = frames.reshape(t, g, PATCH, g, PATCH, CHANNELS).transpose(2, 4, 5, 0, 1, 3).reshape(LATENT_CHANNELS, t, g, g)
    return (x * 2.0 - 1.0).astype(np.float32)


def from_latents(latents: np.ndarray) -> np.ndarray:
    """Inverse of to_latents."""
    _, t, g, _ = latents.shape
    x = latents.reshape(PATCH, PATCH, CHANNELS, t, g, g).transpose(3, 4, 0, 5, 1, 2).reshape(t, SIZE, SIZE, CHANNELS)
    return (x + 1.0) / 2.0


def write_world(root: str, count: int, seed: int, regime: str = "A") -> data_lib.DatasetMeta:
    """`count` clips of the action regime in the training data format under root."""
    rng = np.random.default_rng(seed)
    grid = SIZE // PATCH
    meta = data_lib.DatasetMeta((LATENT_CHANNELS, FRAMES, grid, grid), fps=8.0, action_chunk=FRAMES - 1,
                                action_width=2)
    entries = []
    for i in range(count):
        frames, pushes = rollout(rng, regime)
        entries.append(data_lib.write_sample(root, f"clip{i:05d}", to_latents(frames), CAPTION, pushes, domain=1))
    data_lib.write_dataset(root, meta, entries)
    return meta


def euler_sample(model: Callable[..., GeneratorOutputs], params: dict, text: TextInputs, gen: GeneratorInputs,
                 key: jax.Array, steps: int, shift: float) -> tuple[jax.Array, jax.Array]:
    """Integrate dx/dσ = v from σ = 1 (noise) to 0 over `steps` Euler steps on the shifted grid (the training
    convention: x_σ = σ·ε + (1 − σ)·x0, v = ε − x0, timestep σ·1000) on the noisy frames/rows; clean ones stay
    as given. Returns vision [B, C, T, H, W] and action [B, chunk, A]."""
    if steps < 1:
        raise ValueError(f"the Euler sampler needs steps >= 1, got {steps}")
    t = shift_sigma(jnp.linspace(1.0, 0.0, steps + 1), shift)
    kv, ka = jax.random.split(key)
    v_mask = gen.vision_noisy[:, None, :, None, None]
    a_mask = gen.action_noisy[..., None]
    vision = jnp.where(v_mask, jax.random.normal(kv, gen.vision.shape), gen.vision)
    action = jnp.where(a_mask, jax.random.normal(ka, gen.action.shape), gen.action)
    for i in range(steps):
        sigma = jnp.full(gen.vision.shape[:1], t[i])
        out = model(params, text, gen.replace(vision=vision, action=action, vision_t=sigma * TIMESTEP_SCALE,
                                              action_t=sigma * TIMESTEP_SCALE))
        dt = t[i + 1] - t[i]
        vision = jnp.where(v_mask, vision + dt * out.vision.astype(jnp.float32), vision)
        action = jnp.where(a_mask, action + dt * out.action.astype(jnp.float32), action)
    return vision, action


@functools.lru_cache(maxsize=8)
def jitted_sampler(model: Cosmos3Transformer, steps: int, shift: float) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`euler_sample` for `model`, jitted once per (model, steps, shift) (equal models share it): (params, text,
    gen, key) -> (vision, action)."""
    return jax.jit(lambda p, text, gen, key: euler_sample(model, p, text, gen, key, steps, shift))


def _mean_and_sem(per_clip: np.ndarray) -> tuple[float, float]:
    """Mean over clips and its standard error (std / √n)."""
    return float(per_clip.mean()), float(per_clip.std(ddof=1) / np.sqrt(per_clip.size))


def evaluate(model: Cosmos3Transformer, params: dict, root: str, meta: data_lib.DatasetMeta, cfg: Cosmos3Config,
             train_mean: np.ndarray, steps: int, shift: float, seed: int) -> dict[str, float]:
    """Forward and inverse dynamics MSE on all clips under root, against the two baselines, and the paired gain
    per clip (baseline MSE − model MSE; > 0: the model wins): each a mean over clips with its standard error
    ('..._sem'). steps=1 is the one-step prediction x̂0 = ε − v(ε, σ=1), the model's posterior-mean estimate."""
    samples = [data_lib.load_sample({"id": e["id"], "path": os.path.join(root, e["file"])}, meta, cfg, TEXT_LEN)
               for e in data_lib.read_index(root)]
    sample_fn = jitted_sampler(model, steps, shift)
    truth_frames = np.stack([from_latents(s["latents"]) for s in samples])
    truth_actions = np.stack([s["actions"] for s in samples])
    per_clip = {}
    for task in ("forward", "inverse"):
        rows = [data_lib.pack_sample(s, meta, cfg, TEXT_LEN, task) for s in samples]
        batch = data_lib.to_train_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
        vision, action = sample_fn(params, batch.text, batch.gen, jax.random.key(seed))
        if task == "forward":
            predicted = np.stack([from_latents(np.asarray(v)) for v in vision])
            per_clip["forward_mse"] = np.mean((predicted[:, 1:] - truth_frames[:, 1:]) ** 2, axis=(1, 2, 3, 4))
            copy_last = truth_frames[:, :1]
            per_clip["forward_baseline_copy_last_frame_mse"] = np.mean(
                (copy_last - truth_frames[:, 1:]) ** 2, axis=(1, 2, 3, 4))
        else:
            predicted = np.asarray(action)[..., : truth_actions.shape[-1]]
            per_clip["inverse_mse"] = np.mean((predicted - truth_actions) ** 2, axis=(1, 2))
            per_clip["inverse_baseline_mean_action_mse"] = np.mean((train_mean - truth_actions) ** 2, axis=(1, 2))
    per_clip["forward_gain"] = per_clip["forward_baseline_copy_last_frame_mse"] - per_clip["forward_mse"]
    per_clip["inverse_gain"] = per_clip["inverse_baseline_mean_action_mse"] - per_clip["inverse_mse"]
    results = {}
    for name, errors in per_clip.items():
        results[name], results[f"{name}_sem"] = _mean_and_sem(errors)
    return results


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One training run on the world and its evaluation (defaults: the reported run, 14 min on 2 shared CPU cores)."""

    steps: int = 2000
    batch: int = 16
    train_clips: int = 2048
    eval_clips: int = 128
    lr: float = 1e-3
    schedule: str = "waver"
    shift: float = 3.0
    seed: int = 0
    sampler_steps: tuple[int, ...] = (1, 10)


def train_mean_action(root: str) -> np.ndarray:
    """[action_width] mean push over every row of every clip under root (the inverse-dynamics baseline)."""
    actions = [np.load(os.path.join(root, e["file"]))["actions"] for e in data_lib.read_index(root)]
    return np.concatenate(actions, axis=0).mean(axis=0)


def run_config(model_path: str, data: str, out: str, steps: int, config: Experiment,
               lora: LoraConfig | None = None) -> RunConfig:
    """The world's training run: `steps` steps of config's batch, lr (warmup then cosine), σ schedule and seed on
    the forward and inverse tasks, fp32 on one device, both towers trained (with `lora`: only its adapters)."""
    loss = LossConfig(vision_weight=1.0, action_weight=1.0, schedule=config.schedule, shift=config.shift)
    return RunConfig(model=model_path, data=data, out=out, steps=steps, batch=config.batch, max_text_len=TEXT_LEN,
                     seed=config.seed, dtype="float32", attention="xla", mesh="fsdp=1", save_every=steps, keep=1,
                     task_weights={"forward": 1.0, "inverse": 1.0},
                     optim=OptimConfig(lr=config.lr, warmup_steps=min(100, steps // 5), total_steps=steps,
                                       weight_decay=0.0, freeze_reasoner=False),
                     loss=loss, lora=lora)


def evaluate_samplers(model: Cosmos3Transformer, params: dict, root: str, meta: data_lib.DatasetMeta,
                      cfg: Cosmos3Config, train_mean: np.ndarray, config: Experiment) -> dict[str, float]:
    """`evaluate` with each of config.sampler_steps: metrics named '<metric>@<n>step' (baselines unsuffixed)."""
    metrics: dict[str, float] = {}
    for sampler_steps in config.sampler_steps:
        found = evaluate(model, params, root, meta, cfg, train_mean, steps=sampler_steps, shift=config.shift,
                         seed=config.seed)
        metrics.update({k if "baseline" in k else f"{k}@{sampler_steps}step": v for k, v in found.items()})
    return metrics


def experiment(out: str, config: Experiment, progress: bool = True) -> dict[str, float]:
    """Write train/eval worlds under out, train MODEL with the training loop on the forward and inverse tasks,
    and evaluate on the held-out clips with each sampler step count: metrics named '<metric>@<n>step'."""
    train_root, eval_root = os.path.join(out, "train_data"), os.path.join(out, "eval_data")
    os.makedirs(out, exist_ok=True)
    meta = write_world(train_root, config.train_clips, seed=config.seed)
    write_world(eval_root, config.eval_clips, seed=config.seed + 10_000)
    cfg = Cosmos3Config(**MODEL)
    config_path = os.path.join(out, "model_config.json")
    cfg.to_json(config_path)
    start = time.perf_counter()
    result = train(run_config(config_path, train_root, os.path.join(out, "run"), config.steps, config),
                   progress=progress)
    train_seconds = time.perf_counter() - start
    model = result["model"]
    params = compute_params(result["state"].params, model.dtype)
    metrics = evaluate_samplers(model, params, eval_root, meta, cfg, train_mean_action(train_root), config)
    metrics.update(train_seconds=train_seconds, steps_per_second=config.steps / train_seconds,
                   steps=config.steps, batch=config.batch, final_loss=result["metrics"]["loss/total"])
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write a dataset of clips")
    make.add_argument("--out", required=True)
    make.add_argument("--clips", type=int, default=512)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--regime", choices=sorted(CONTROLS), default="A", help="the action regime (see above)")
    exp = sub.add_parser("experiment", help="train a small model on CPU and evaluate against the baselines")
    exp.add_argument("--out", required=True)
    defaults = Experiment()
    for field in dataclasses.fields(Experiment):
        if field.name != "sampler_steps":
            exp.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                             default=getattr(defaults, field.name))
    exp.add_argument("--sampler-steps", type=int, nargs="+", default=list(defaults.sampler_steps))
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.command == "make":
        write_world(args.out, args.clips, args.seed, args.regime)
    else:
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Experiment)}
        fields["sampler_steps"] = tuple(fields["sampler_steps"])
        print(json.dumps(experiment(args.out, Experiment(**fields), progress=not args.quiet), indent=1))


if __name__ == "__main__":
    main()

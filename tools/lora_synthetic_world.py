"""LoRA against a full fine-tune on the pushed-disc world: from a base trained on action regime A to regime B.

    python tools/lora_synthetic_world.py --out /tmp/lora_world

trains the world's MODEL on regime A (pushes move the disc along themselves), then from that base fine-tunes on
regime B (the controls turned a quarter turn) twice over the same steps, batch and learning rate: fully (every
parameter, AdamW state for all) and with LoRA adapters (each `--lora RANK:TARGETS`; only the adapters train and
only they have optimizer state). All are evaluated on held-out regime-B clips with the world's forward- and
inverse-dynamics metrics (the base also on regime A), and for each LoRA run

    gain recovered = (base − LoRA) / (base − full fine-tune)    per metric (1: all of the full fine-tune's gain),

beside its trainable parameters and optimizer-state bytes (summed over the leaves of the run's own optax state)
as fractions of the full fine-tune's. Writes <out>/lora_world.json and prints a table. Everything is seeded: a
rerun into a fresh --out gives the same figures (the timings aside).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

import synthetic_world as world
from cosmos_jax.config import Cosmos3Config
from cosmos_jax.training import lora as lora_lib
from cosmos_jax.training.loop import train
from cosmos_jax.training.step import compute_params

WIDE_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ALL_TARGETS = f"{WIDE_TARGETS},proj_in,proj_out,action_proj_in,action_proj_out"  # + the modality projections
COMPARED = ("forward_mse", "inverse_mse")  # at the 1-step sampler (x̂0 at σ = 1)


@dataclasses.dataclass(frozen=True)
class LoraWorldExperiment:
    """The base run, the fine-tune budget shared by the full and the LoRA fine-tunes, and the LoRA variants
    ('RANK:TARGETS', targets as for `--lora-targets`). With these defaults the base is `synthetic_world.py
    experiment`'s default run (same clips, seeds and schedule): 1000 steps did not yet beat the copy-last-frame
    forward baseline."""

    base_steps: int = 2000
    finetune_steps: int = 300
    batch: int = 16
    train_clips: int = 2048
    eval_clips: int = 128
    lr: float = 1e-3
    seed: int = 0
    lora: tuple[str, ...] = (f"8:{lora_lib.DEFAULT_TARGETS}", f"16:{ALL_TARGETS}")


def parse_variant(spec: str) -> lora_lib.LoraConfig:
    """'8:q_proj,v_proj' -> LoraConfig(rank 8, those generator linears); ValueError naming --lora."""
    rank, sep, targets = spec.partition(":")
    if not sep or not rank.strip().isdigit():
        raise ValueError(f"--lora {spec!r}: write RANK:TARGETS, e.g. 8:{lora_lib.DEFAULT_TARGETS}")
    return lora_lib.LoraConfig(int(rank), lora_lib.parse_targets(targets))


def gain_recovered(base: float, full: float, low_rank: float) -> float | None:
    """(base − low_rank) / (base − full): the share of the full fine-tune's improvement the LoRA run reaches
    (None when the full fine-tune did not move the metric)."""
    return None if full == base else (base - low_rank) / (base - full)


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of a pytree (shape × itemsize)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def parameter_count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def sized(params: Any, opt_state: Any) -> dict[str, int]:
    """The trainable parameters and optimizer-state bytes of a finished run's state."""
    return {"trainable_parameters": parameter_count(params), "optimizer_bytes": tree_bytes(opt_state)}


def machine() -> dict[str, Any]:
    """The CPU model (/proc/cpuinfo), its core count and the load average when the experiment starts."""
    model = "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return {"cpu": model, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
            "jax_backend": jax.default_backend()}


def world_config(config: LoraWorldExperiment, steps: int) -> world.Experiment:
    return world.Experiment(steps=steps, batch=config.batch, train_clips=config.train_clips,
                            eval_clips=config.eval_clips, lr=config.lr, seed=config.seed, sampler_steps=(1,))


def finetune(model_path: str, data: str, out: str, base_params: Any, config: world.Experiment,
             lora: lora_lib.LoraConfig | None = None) -> dict[str, Any]:
    """Fine-tune `base_params` on the world under `data` for config.steps: every parameter, or only `lora`'s
    adapters. Returns the state, the model, the evaluation weights (LoRA: merged into the base), the sizes and the
    wall time."""
    start = time.perf_counter()
    result = train(world.run_config(model_path, data, out, config.steps, config, lora=lora),
                   init_params=lambda _: base_params, progress=False)
    seconds = time.perf_counter() - start
    state, model = result["state"], result["model"]
    weights = state.params if lora is None else lora_lib.merge(base_params, [(state.params, lora.scale)])
    return {"state": state, "model": model, "params": compute_params(weights, model.dtype),
            "sizes": sized(state.params, state.opt_state), "train_seconds": seconds,
            "final_loss": result["metrics"]["loss/total"]}


def experiment(out: str, config: LoraWorldExperiment) -> dict[str, Any]:
    """Worlds, base, full and LoRA fine-tunes and their evaluations under `out` (which must be new or empty: the
    training loop would resume a run found there)."""
    variants = [parse_variant(v) for v in config.lora]
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"error: --out {out} is not empty (a rerun needs a fresh folder)")
    roots = {name: os.path.join(out, name) for name in ("train_A", "eval_A", "train_B", "eval_B")}
    meta = world.write_world(roots["train_A"], config.train_clips, seed=config.seed, regime="A")
    world.write_world(roots["eval_A"], config.eval_clips, seed=config.seed + 10_000, regime="A")
    world.write_world(roots["train_B"], config.train_clips, seed=config.seed + 20_000, regime="B")
    world.write_world(roots["eval_B"], config.eval_clips, seed=config.seed + 30_000, regime="B")
    cfg = Cosmos3Config(**world.MODEL)
    model_path = os.path.join(out, "model_config.json")
    cfg.to_json(model_path)
    mean = {r: world.train_mean_action(roots[f"train_{r}"]) for r in "AB"}
    base_cfg, tune_cfg = world_config(config, config.base_steps), world_config(config, config.finetune_steps)

    def evaluate(run: Mapping[str, Any], regime: str) -> dict[str, float]:
        return world.evaluate_samplers(run["model"], run["params"], roots[f"eval_{regime}"], meta, cfg,
                                       mean[regime], tune_cfg)

    start = time.perf_counter()
    base = train(world.run_config(model_path, roots["train_A"], os.path.join(out, "base"), config.base_steps,
                                  base_cfg), progress=False)
    base_seconds = time.perf_counter() - start
    base_params = base["state"].params
    base_run = {"model": base["model"], "params": compute_params(base_params, base["model"].dtype)}
    results: dict[str, Any] = {
        "config": dataclasses.asdict(config), "machine": machine(),
        "base": {"A": evaluate(base_run, "A"), "B": evaluate(base_run, "B"), "train_seconds": base_seconds,
                 "final_loss": base["metrics"]["loss/total"]},
    }
    full = finetune(model_path, roots["train_B"], os.path.join(out, "full"), base_params, tune_cfg)
    results["full"] = {"B": evaluate(full, "B"), **full["sizes"], "train_seconds": full["train_seconds"],
                       "final_loss": full["final_loss"]}
    del full
    results["lora"] = []
    for index, variant in enumerate(variants):
        tuned = finetune(model_path, roots["train_B"], os.path.join(out, f"lora{index}"), base_params, tune_cfg,
                         lora=variant)
        metrics = evaluate(tuned, "B")
        sizes = tuned["sizes"]
        results["lora"].append({
            "rank": variant.rank, "targets": ["/".join(t) for t in variant.targets], "B": metrics, **sizes,
            "parameter_fraction": sizes["trainable_parameters"] / results["full"]["trainable_parameters"],
            "optimizer_fraction": sizes["optimizer_bytes"] / results["full"]["optimizer_bytes"],
            "gain_recovered": {m: gain_recovered(*(run[f"{m}@1step"] for run in (results["base"]["B"],
                                                                                 results["full"]["B"], metrics)))
                               for m in COMPARED},
            "train_seconds": tuned["train_seconds"], "final_loss": tuned["final_loss"],
        })
    results["total_seconds"] = time.perf_counter() - start
    results["load_average_at_end"] = os.getloadavg()
    return results


def _short_targets(targets: Sequence[str]) -> str:
    return ",".join(t.split("/")[-2] for t in targets)


def table(results: Mapping[str, Any]) -> str:
    """A markdown table of the held-out regime-B metrics (mean ± s.e.m.), sizes and gains recovered."""
    def metric(row: Mapping[str, float], name: str) -> str:
        return f"{row[name + '@1step']:.4f} ± {row[name + '_sem@1step']:.4f}"

    def recovered(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.0f}%"

    full = results["full"]
    lines = ["| model (on regime B) | forward MSE | inverse MSE | trainable params | optimizer bytes | "
             "gain recovered fwd / inv | train s |", "|---|---:|---:|---:|---:|---:|---:|"]
    base = results["base"]
    b = base["B"]
    lines.append(f"| base (regime A) | {metric(b, COMPARED[0])} | {metric(b, COMPARED[1])} | – | – | 0% / 0% | "
                 f"{base['train_seconds']:.0f} |")
    lines.append(f"| full fine-tune | {metric(full['B'], COMPARED[0])} | {metric(full['B'], COMPARED[1])} | "
                 f"{full['trainable_parameters']:,} | {full['optimizer_bytes']:,} | 100% / 100% | "
                 f"{full['train_seconds']:.0f} |")
    for run in results["lora"]:
        gains = " / ".join(recovered(run["gain_recovered"][m]) for m in COMPARED)
        lines.append(f"| LoRA r{run['rank']} {_short_targets(run['targets'])} | {metric(run['B'], COMPARED[0])} | "
                     f"{metric(run['B'], COMPARED[1])} | {run['trainable_parameters']:,} "
                     f"({100 * run['parameter_fraction']:.2f}%) | {run['optimizer_bytes']:,} "
                     f"({100 * run['optimizer_fraction']:.2f}%) | {gains} | {run['train_seconds']:.0f} |")
    a = base["A"]
    lines.append("")
    lines.append(f"base on regime A: forward {metric(a, COMPARED[0])} (copy last frame "
                 f"{a['forward_baseline_copy_last_frame_mse']:.4f}), inverse {metric(a, COMPARED[1])} (mean action "
                 f"{a['inverse_baseline_mean_action_mse']:.4f}); regime-B baselines: forward "
                 f"{b['forward_baseline_copy_last_frame_mse']:.4f}, inverse {b['inverse_baseline_mean_action_mse']:.4f}")
    return "\n".join(lines)


def write_json(path: str, results: Mapping[str, Any]) -> None:
    """`results` as JSON at path, written to a temporary name and renamed."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a new or empty folder")
    defaults = LoraWorldExperiment()
    for field in dataclasses.fields(LoraWorldExperiment):
        if field.name != "lora":
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                                default=getattr(defaults, field.name))
    parser.add_argument("--lora", nargs="+", default=list(defaults.lora), metavar="RANK:TARGETS",
                        help="the LoRA variants (default: %(default)s)")
    args = parser.parse_args()
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoraWorldExperiment)}
    fields["lora"] = tuple(fields["lora"])
    config = LoraWorldExperiment(**fields)
    try:
        for variant in config.lora:
            parse_variant(variant)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    results = experiment(args.out, config)
    write_json(os.path.join(args.out, "lora_world.json"), results)
    print(table(results))


if __name__ == "__main__":
    main()

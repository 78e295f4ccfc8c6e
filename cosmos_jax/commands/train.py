"""`cosmos-jax train --config CFG --data DIR --out DIR`: flow-matching training (resumes from OUT/checkpoints).

--config is a preset name (tiny, nano, ...) or a transformer config.json; --init optionally starts from the
weights of a Hub-layout or converted model folder (`cosmos_jax.convert.load`). Metrics land in OUT/metrics
(TensorBoard event files + metrics.jsonl); checkpoints in OUT/checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax.numpy as jnp

from cosmos_jax.commands import errors
from cosmos_jax.training.loop import RunConfig, train
from cosmos_jax.training.losses import LossConfig, shift_for_resolution
from cosmos_jax.training.step import OptimConfig


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="model preset name or transformer config.json")
    parser.add_argument("--data", required=True, help="dataset directory (cosmos_jax/training/data.py format)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints/ and metrics/")
    parser.add_argument("--init", default=None, help="start from this model folder's transformer weights")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (a resumed run continues)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    parser.add_argument("--ema", type=float, default=None, help="EMA decay (off when omitted)")
    tower = parser.add_mutually_exclusive_group()
    tower.add_argument("--freeze-reasoner", dest="freeze_reasoner", action="store_true", default=True,
                       help="train the generator tower only (the default)")
    tower.add_argument("--train-both", dest="freeze_reasoner", action="store_false",
                       help="train the reasoner tower too")
    parser.add_argument("--mesh", default=None, metavar="fsdp=N[,tensor=M,...]",
                        help="device mesh over all devices, e.g. fsdp=8 or fsdp=4,context=2 (context > 1: the "
                             "generator sequence is split across devices, context-parallel attention); default: fsdp "
                             "over all")
    parser.add_argument("--mesh-rules", default="tiny", help="mesh preset whose rules shard the parameters")
    parser.add_argument("--max-text-len", type=int, default=64, help="caption tokens per sample (longer are cut)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    parser.add_argument("--remat", action="store_true", help="rematerialise each layer (less memory, more compute)")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "blocked", "pallas"),
                        help="attention implementation")
    parser.add_argument("--schedule", choices=("waver", "logitnormal"), default="waver",
                        help="noise-level sampling schedule")
    parser.add_argument("--resolution", type=int, default=256, help="selects the σ shift {256: 3, 480: 5, 720: 10}")
    parser.add_argument("--loss-weights", type=json.loads, default=None,
                        help='JSON, e.g. {"vision": 10, "action": 10, "sound": 2, "text": 0}')
    parser.add_argument("--tasks", type=json.loads, default=None, help='JSON task weights, e.g. {"forward": 1}')
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--skip-bad", action="store_true", help="skip (log, count) bad samples instead of failing")
    parser.add_argument("--seed", type=int, default=0, help="data order and noise seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--lora-rank", type=int, default=None, metavar="R",
                        help="train only rank-R LoRA adapters on frozen base weights (saved to OUT/lora)")
    parser.add_argument("--lora-targets", default=None, metavar="RULES",
                        help="comma-separated [generator/|reasoner/]NAME, NAME one of q_proj k_proj v_proj o_proj "
                             "gate_proj up_proj down_proj, or a generator projection: proj_in proj_out "
                             "audio_proj_in audio_proj_out action_proj_in action_proj_out (one adapter per "
                             "embodiment domain; not exportable to PEFT) (default: the generator's "
                             "q_proj,k_proj,v_proj,o_proj)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (update scale alpha/R; default R)")


def _loss_config(args: argparse.Namespace) -> LossConfig:
    weights: dict[str, Any] = dict(args.loss_weights or {})
    unknown = set(weights) - {"vision", "action", "sound", "text"}
    if unknown:
        raise ValueError(f"--loss-weights: unknown modalities {sorted(unknown)}")
    return LossConfig(schedule=args.schedule, shift=shift_for_resolution(args.resolution),
                      **{f"{k}_weight": float(v) for k, v in weights.items()})


def _lora_config(args: argparse.Namespace) -> Any:
    from cosmos_jax.training.lora import DEFAULT_TARGETS, LoraConfig, parse_targets

    if args.lora_rank is None:
        if args.lora_targets is not None or args.lora_alpha is not None:
            raise ValueError("--lora-targets and --lora-alpha need --lora-rank")
        return None
    return LoraConfig(rank=args.lora_rank, targets=parse_targets(args.lora_targets or DEFAULT_TARGETS),
                      alpha=args.lora_alpha)


def _check_args(args: argparse.Namespace) -> None:
    """Flags and paths that need no model, before anything is built."""
    from cosmos_jax.sharding import MeshSpecError, parse_mesh_spec

    errors.input_path(args.data, "--data", folder=True)
    errors.input_path(args.init, "--init", folder=True)
    errors.output_path(os.path.join(args.out, "checkpoints"), "--out", overwrite=True)
    for flag in ("steps", "batch", "grad_accum", "save_every", "keep", "max_text_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    errors.finite(args.lr, "--lr", low=0, low_open=True)
    errors.finite(args.weight_decay, "--weight-decay", low=0)
    errors.finite(args.clip, "--clip", low=0, low_open=True)
    errors.finite(args.ema, "--ema", low=0, high=1)
    if args.mesh is not None:
        try:
            parse_mesh_spec(args.mesh)
        except MeshSpecError as e:
            raise ValueError(f"--mesh: {e}") from None


def run(args: argparse.Namespace) -> int:
    lora = _lora_config(args)
    _check_args(args)
    optim = OptimConfig(lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps, weight_decay=args.weight_decay,
                        clip_norm=args.clip, ema_decay=args.ema, freeze_reasoner=args.freeze_reasoner,
                        grad_accum=args.grad_accum)
    config = RunConfig(model=args.config, data=args.data, out=args.out, steps=args.steps, batch=args.batch,
                       max_text_len=args.max_text_len, seed=args.seed, dtype=args.dtype, remat=args.remat,
                       attention=args.attention, mesh=args.mesh, rules=args.mesh_rules,
                       save_every=args.save_every, keep=args.keep, skip_bad=args.skip_bad, task_weights=args.tasks,
                       optim=optim, loss=_loss_config(args), lora=lora)
    init = None
    if args.init:
        from cosmos_jax.convert.load import load

        init = lambda model: load(args.init, dtype=jnp.float32, components=("transformer",)).params  # noqa: E731
    result = train(config, init_params=init, progress=not args.no_progress)
    print(json.dumps({"step": args.steps, "skipped": len(result["skipped"]), **result["metrics"]}, indent=1))
    return 0

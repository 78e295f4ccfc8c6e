"""Quality of weight-only int8/fp8 against bf16 on the tiny demo pipeline, every generation mode, fixed noise.

For each mode the pipeline runs with the same seed in fp32, bf16, bf16 + int8 and bf16 + fp8 layer linears; the
table gives the relative L2 error ||x - x_bf16|| / ||x_bf16|| of the final vision latents and of the actions, beside
the bf16-vs-fp32 spread of the same run (the rounding any bf16 run already carries). Also the transformer's
device bytes per mode. Writes JSON (--out) and prints a markdown table.

    python tools/bench_quantize.py --steps 4 --out quantize.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cosmos_jax.convert.quantize import tree_bytes
from cosmos_jax.demo import build_demo_checkpoint, demo_image
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest

ACTION = dict(domain="bridge_orig_lerobot", resolution_tier=256, chunk=8, guidance=1.0)


def _cases() -> dict[str, dict]:
    image = demo_image(64, 64)
    video = np.stack([np.asarray(demo_image(64, 64))] * 9)
    actions = np.linspace(-1, 1, 8 * 10, dtype=np.float32).reshape(8, 10)
    return {
        "text2video": dict(num_frames=9, height=64, width=64, guidance=6.0),
        "image2video": dict(image=image, num_frames=9, height=64, width=64, guidance=3.0),
        "policy": dict(ACTION, action_mode="policy", image=image),
        "forward_dynamics": dict(ACTION, action_mode="forward_dynamics", image=image, actions=actions),
        "inverse_dynamics": dict(ACTION, action_mode="inverse_dynamics", video=video),
    }


def reference_spread(checkpoint: Path, steps: int) -> dict[str, dict[str, float]]:
    """The PyTorch reference's own bf16-vs-fp32 relative L2 on the same checkpoint, starting latents drawn once
    (fp32) and given to both runs (text2video and policy)."""
    import torch
    from diffusers import Cosmos3OmniPipeline
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition

    out: dict[str, dict[str, float]] = {}
    runs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        pipe = Cosmos3OmniPipeline.from_pretrained(str(checkpoint), torch_dtype=dtype, enable_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for mode in ("text2video", "policy"):
            action = None
            kwargs = dict(num_frames=9, height=64, width=64, guidance_scale=6.0)
            if mode == "policy":
                action = CosmosActionCondition(mode="policy", chunk_size=8, domain_name=ACTION["domain"],
                                               resolution_tier=256, raw_actions=None, image=demo_image(64, 64))
                kwargs = dict(num_frames=None, height=None, width=None, guidance_scale=1.0)
            with torch.no_grad():
                start = pipe.prepare_latents(
                    image=None, video=None, num_frames=kwargs["num_frames"] or 9, height=kwargs["height"],
                    width=kwargs["width"], fps=24.0, generator=torch.Generator().manual_seed(0), device="cpu",
                    dtype=torch.float32, enable_sound=False, action=action)
            captured = {}
            result = pipe("A robot arm picks up the dark block.", action=action, fps=24.0, num_inference_steps=steps,
                          latents=start[0], action_latents=start[2], output_type="latent",
                          callback_on_step_end=lambda p, i, t, d: captured.update(latents=d["latents"].float()) or {},
                          enable_safety_check=False, **kwargs)
            runs[name, mode] = (captured["latents"].numpy(),
                                None if not result.action else result.action[0].float().numpy())
    for mode in ("text2video", "policy"):
        (l32, a32), (l16, a16) = runs["fp32", mode], runs["bf16", mode]
        out[mode] = {"latents": _rel(l16, l32)}
        if a32 is not None:
            out[mode]["actions"] = _rel(a16, a32)
    return out


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((x - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpoint", default=None, help="demo checkpoint folder (built if missing)")
    parser.add_argument("--out", default=None, help="JSON report path")
    parser.add_argument("--reference", action="store_true",
                        help="also run the PyTorch reference in fp32 and bf16 (its own spread; text2video, policy)")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint or tempfile.mkdtemp(prefix="cosmos_demo_")) / "ckpt"
    build_demo_checkpoint(checkpoint)
    variants = {"fp32": (jnp.float32, None), "bf16": (jnp.bfloat16, None), "int8": (jnp.bfloat16, "int8"),
                "fp8": (jnp.bfloat16, "fp8")}
    pipelines = {name: Cosmos3Pipeline.from_pretrained(checkpoint, dtype=dt, attention="xla", quantize=q)
                 for name, (dt, q) in variants.items()}
    report: dict = {"steps": args.steps, "transformer_bytes": {n: tree_bytes(p.params) for n, p in pipelines.items()},
                    "modes": {}}
    for mode, kwargs in _cases().items():
        request = GenerationRequest("A robot arm picks up the dark block.", steps=args.steps, seed=0,
                                    output_type="latent", **kwargs)
        results = {n: p(request, progress=False) for n, p in pipelines.items()}
        ref = results["bf16"]
        row = {}
        for n in ("fp32", "int8", "fp8"):
            row[n] = {"latents": _rel(results[n].latents, ref.latents)}
            if ref.actions is not None:
                row[n]["actions"] = _rel(results[n].actions, ref.actions)
        report["modes"][mode] = row
    print("| mode | int8 latents | fp8 latents | bf16 vs fp32 latents | int8 actions | fp8 actions | "
          "bf16 vs fp32 actions |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda row, n, k: f"{row[n][k]:.2e}" if k in row[n] else "–"  # noqa: E731
    for mode, row in report["modes"].items():
        print(f"| {mode} | {fmt(row, 'int8', 'latents')} | {fmt(row, 'fp8', 'latents')} | "
              f"{fmt(row, 'fp32', 'latents')} | {fmt(row, 'int8', 'actions')} | {fmt(row, 'fp8', 'actions')} | "
              f"{fmt(row, 'fp32', 'actions')} |")
    print("transformer bytes:", report["transformer_bytes"])
    if args.reference:
        report["reference_bf16_vs_fp32"] = reference_spread(checkpoint, args.steps)
        print("reference bf16 vs fp32:", report["reference_bf16_vs_fp32"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

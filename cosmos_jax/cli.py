"""`cosmos-jax` command line: one subcommand per module in cosmos_jax/commands/ (each has add_parser and run)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "Run the full pipeline on the embedded tiny checkpoint: a video, an action plot, a report.",
    "generate": "Generate video (+ sound) or actions with a Cosmos 3 model.",
    "reason": "Answer in text about a prompt, images or a video with the reasoner.",
    "convert": "Convert a Hub-layout (safetensors) checkpoint into a cosmos-jax (orbax) checkpoint.",
    "export": "Export a cosmos-jax checkpoint back to the diffusers/transformers safetensors layout.",
    "plan": "Plan memory for a config on a device mesh (abstract, nothing allocated).",
    "train": "Fine-tune with flow matching (and optionally the language loss).",
    "prepare": "Turn a robot dataset (LeRobot v2 layout) into cosmos-jax training data (VAE latents, captions, actions).",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmos-jax",
        description="NVIDIA Cosmos 3 in JAX/Flax: generation, reasoning, conversion, planning and training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"cosmos_jax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cosmos_jax.commands.{name}":
                raise
            continue
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"cosmos_jax.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

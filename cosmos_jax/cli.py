"""`cosmos-jax` command line: one subcommand per module in cosmos_jax/commands/ (each has add_parser and run).

Every command follows one error convention (cosmos_jax/commands/errors.py): bad input prints
`error: <one line naming the flag or file>` to stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from importlib import metadata

from cosmos_jax.commands.errors import HANDLED, report

COMMANDS = {
    "demo": "Run the full pipeline on the embedded tiny checkpoint: a video, an action plot, a report.",
    "generate": "Generate video (+ sound) or actions with a Cosmos 3 model.",
    "reason": "Answer in text about a prompt, images or a video with the reasoner.",
    "convert": "Convert a Hub-layout (safetensors) checkpoint into a cosmos-jax (orbax) checkpoint.",
    "export": "Export a cosmos-jax checkpoint back to the diffusers/transformers safetensors layout.",
    "plan": "Plan memory for a config on a device mesh (abstract, nothing allocated).",
    "train": "Fine-tune with flow matching (and optionally the language loss).",
    "sdg": "Synthetic robot data: a jobs file -> an action-labelled LeRobot dataset with consistency scores.",
    "prepare": "Turn a robot dataset (LeRobot v2 layout) into cosmos-jax training data (VAE latents, captions, actions).",
    "serve": "Serve a model: openpi WebSocket policy endpoint and the /v1/videos jobs API.",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs kept as written; every option's help ends with its default unless the text already states one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, argparse.SUPPRESS) and default != []
                and "default" not in text.lower() and not isinstance(action, argparse._StoreTrueAction)):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
        return text


def _version() -> str:
    try:
        return metadata.version("cosmos-jax")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmos-jax",
        description="NVIDIA Cosmos 3 in JAX/Flax: generation, reasoning, conversion, planning and training.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cosmos-jax {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"cosmos_jax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cosmos_jax.commands.{name}":
                raise
            continue
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # JAX starts threads at import; ffmpeg and the plan child are started with fork+exec, which is safe, but
    # os.fork() warns about it on every run.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    module = importlib.import_module(f"cosmos_jax.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except HANDLED as e:
        return report(e)
    except SystemExit as e:
        if isinstance(e.code, str):
            return report(e.code)
        raise


if __name__ == "__main__":
    sys.exit(main())

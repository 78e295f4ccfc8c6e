"""Subcommands of `cosmos-jax`; each module defines `add_parser(parser)` and `run(args) -> int`."""

"""`cosmos-jax serve`: the openpi WebSocket policy endpoint and the /v1/videos jobs API on one port."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from cosmos_jax.commands.errors import input_path
from cosmos_jax.commands.model_options import ModelOptions, add_model_arguments, check_model_arguments, load_pipeline
from cosmos_jax.sampling.prompts import EMBODIMENT_DOMAINS

_DTYPES = ("bfloat16", "float32")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve a model: openpi's WebSocket policy protocol on ws://HOST:PORT/ (and /v1/realtime/robot/openpi), "
        "OpenAI-style video jobs on /v1/videos, /healthz and /metrics. Concurrent same-shape requests are "
        "batched. SIGTERM finishes accepted requests, then exits.")
    parser.add_argument("--model", required=True, help="model folder (Hub layout as published, or converted)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port of both the WebSocket and the HTTP API")
    parser.add_argument("--mesh", default=None, metavar="data=N[,fsdp=M,...]",
                        help="device mesh; batches are sharded over its data axis (default: one device)")
    parser.add_argument("--mesh-rules", default="tiny", help="mesh preset whose rules shard the parameters")
    parser.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="weights and activations")
    parser.add_argument("--attention", default="auto", help="attention implementation: auto, xla, blocked, pallas")
    add_model_arguments(parser.add_argument_group("model options (as generate's; /healthz reports them)"))
    parser.add_argument("--max-batch", type=int, default=4, help="most requests in one batched call")
    parser.add_argument("--max-wait-ms", type=float, default=20.0,
                        help="how long the first request of a batch waits for same-shape company")
    parser.add_argument("--queue", type=int, default=64, help="most waiting requests; past it: 429 + Retry-After")
    parser.add_argument("--api-key", default=None,
                        help="refuse requests without this key (401); default: $COSMOS_JAX_API_KEY if set, else none")
    parser.add_argument("--results", default="cosmos-jax-results",
                        help="folder for /v1/videos jobs and their outputs (kept across restarts)")
    policy = parser.add_argument_group("policy requests (defaults for fields a request leaves out)")
    policy.add_argument("--domain", default=None, help=f"embodiment: one of {', '.join(sorted(EMBODIMENT_DOMAINS))}")
    policy.add_argument("--chunk", type=int, default=16, help="actions per chunk (a multiple of 4)")
    policy.add_argument("--steps", type=int, default=35, help="denoising steps")
    policy.add_argument("--resolution-tier", type=int, default=480, choices=(256, 480, 704, 720),
                        help="canvas tier the observation image is resized to")
    limits = parser.add_argument_group("limits (a request over one gets a 4xx naming the field)")
    limits.add_argument("--max-request-mb", type=float, default=32.0, help="an HTTP body or WebSocket message")
    limits.add_argument("--max-upload-mb", type=float, default=16.0, help="one uploaded file")
    limits.add_argument("--max-image-side", type=int, default=1280, help="pixels on the longer side")
    limits.add_argument("--max-frames", type=int, default=189, help="frames generated or uploaded")
    limits.add_argument("--max-steps", type=int, default=50, help="denoising steps of a request")
    limits.add_argument("--max-chunk", type=int, default=64, help="actions per chunk")


def _check(args: argparse.Namespace) -> ModelOptions:
    input_path(args.model, "--model", folder=True)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for flag in ("max_batch", "queue", "chunk", "steps", "max_image_side", "max_frames", "max_steps", "max_chunk"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_wait_ms", "max_request_mb", "max_upload_mb"):
        if not 0 <= getattr(args, flag) < float("inf"):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.domain is not None and args.domain not in EMBODIMENT_DOMAINS:
        raise ValueError(f"--domain {args.domain!r} is not one of {sorted(EMBODIMENT_DOMAINS)}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    return check_model_arguments(args)


def build_state(args: argparse.Namespace) -> tuple[Any, ModelOptions]:
    """Check the arguments, load the model with its options and make the server's state (nothing is served yet);
    (the state, the checked model options)."""
    if args.api_key is None:
        args.api_key = os.environ.get("COSMOS_JAX_API_KEY")
    options = _check(args)
    from cosmos_jax.serve.engine import Engine
    from cosmos_jax.serve.fields import PolicyDefaults
    from cosmos_jax.serve.limits import Limits
    from cosmos_jax.serve.state import create_state

    mesh = rules = None
    if args.mesh is not None:
        from cosmos_jax import sharding

        mesh = sharding.make_mesh(args.mesh)
        rules = sharding.load_mesh_preset(args.mesh_rules).rules
    pipeline = load_pipeline(args, options, mesh=mesh, rules=rules)
    if args.max_batch % pipeline.data_size:
        raise ValueError(f"--max-batch {args.max_batch} must be a multiple of the mesh's data axis "
                         f"({pipeline.data_size})")
    defaults = PolicyDefaults(domain=args.domain, chunk=args.chunk, steps=args.steps,
                              resolution_tier=args.resolution_tier)
    limits = Limits(max_body_bytes=int(args.max_request_mb * 1024**2),
                    max_upload_bytes=int(args.max_upload_mb * 1024**2), max_image_side=args.max_image_side,
                    max_frames=args.max_frames, max_steps=args.max_steps, max_chunk=args.max_chunk)
    engine = Engine(pipeline, os.path.basename(os.path.normpath(args.model)), defaults,
                    model_options=options.report())
    state = create_state(engine, results=args.results, limits=limits, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, queue=args.queue, api_key=args.api_key)
    if state.store.recovered_failed:
        print(f"{state.store.recovered_failed} job(s) left queued or running by a stopped server are marked failed",
              file=sys.stderr)
    return state, options


def run(args: argparse.Namespace) -> int:
    from cosmos_jax.serve.server import serve

    state, options = build_state(args)
    flags = " ".join(options.flags()) or "none"
    print(f"serving {state.engine.model_name} on http://{args.host}:{args.port} (openpi: ws://{args.host}:{args.port}/"
          f"); model options: {flags}; results in {args.results}", file=sys.stderr, flush=True)
    serve(state, args.host, args.port)
    return 0

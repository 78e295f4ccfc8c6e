"""`cosmos-jax sdg`: a jobs file -> an action-labelled LeRobot v3.0 dataset with consistency scores."""

from __future__ import annotations

import argparse
from typing import Any

from cosmos_jax.commands.model_options import ModelOptions, add_model_arguments, check_model_arguments, load_pipeline

_DTYPES = ("float32", "bfloat16")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Resumable: re-run the same command after a kill and it continues; a re-run over the finished "
                     "dataset does nothing. Under jax.distributed every process runs its share and process 0 merges. "
                     "An episode is reproduced by `cosmos-jax generate` with its job's fields, --seed SEED, "
                     "--num-samples INDEX+1 (sample INDEX is the last) and the run's model options (the episode's "
                     "quantize, lora and merge_lora: --quantize, --lora, --merge-lora). Compiled programs are kept in "
                     "the persistent compile cache (COSMOS_JAX_COMPILE_CACHE); --warm-only fills it ahead of time "
                     "for the same command line.")
    parser.add_argument("--model", default=None, help="model folder (Hub layout as published, or converted)")
    parser.add_argument("--jobs", default=None, help="JOBS.jsonl: one job per line, fields named as generate's "
                                                     "flags in snake_case plus samples, chunks, camera, id")
    parser.add_argument("--out", default=None, help="the dataset folder to write (LeRobot v3.0)")
    parser.add_argument("--merge", default=None, metavar="DATASET",
                        help="only merge the shards of a run that stopped before its merge")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: the data axis)")
    parser.add_argument("--mesh", default=None, metavar="data=N", help="mesh over this process's devices")
    parser.add_argument("--mesh-rules", default="tiny", help="mesh preset whose rules shard the parameters")
    parser.add_argument("--dtype", choices=_DTYPES, default="bfloat16",
                        help="weights and activations dtype (float32 for exact reproduction checks)")
    parser.add_argument("--attention", default="auto", help="attention implementation: auto, xla, blocked, pallas")
    add_model_arguments(parser.add_argument_group(
        "model options (as generate's; --quantize and --lora enter the model fingerprint and every episode)"))
    parser.add_argument("--best-of", type=int, default=1, help="candidates per episode; the best score is kept")
    parser.add_argument("--min-consistency", type=float, default=None,
                        help="drop episodes whose consistency score (0..1, exp(-error)) is below this")
    parser.add_argument("--critic", action="store_true",
                        help="the model's reasoner rates each candidate clip's physical plausibility 1-5 "
                             "(critic_score, null when its answer has no clear 1-5; critic_answer verbatim)")
    parser.add_argument("--distributed", action="store_true",
                        help="join a jax.distributed job first (SLURM, Open MPI, Cloud TPU and Kubernetes are "
                             "detected; elsewhere give --coordinator, --num-processes and --process-id)")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="jax.distributed coordinator")
    parser.add_argument("--num-processes", type=int, default=None, help="jax.distributed process count")
    parser.add_argument("--process-id", type=int, default=None, help="this process's jax.distributed index")
    parser.add_argument("--skip-bad", action="store_true", help="report bad job lines and skip them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--warm-only", action="store_true",
                        help="compile every program this run would use into the compile cache and stop: check the "
                             "jobs, build every batch and compile each pass (nothing runs; --out is not touched "
                             "and not needed). Give the run's other flags (batch size, best-of, dtype, mesh, "
                             "attention, model options, critic); one process (not with --distributed)")


def run(args: argparse.Namespace) -> int:
    """Bad input raises (cli.main prints `error: ...`, exit 2); a bad jobs file prints one error per bad line."""
    from cosmos_jax.commands.errors import EXIT_USAGE, report
    from cosmos_jax.sdg.engine import Settings
    from cosmos_jax.sdg.jobs import JobErrors
    from cosmos_jax.sdg.run import merge_only, run_sdg, warm_sdg

    if args.merge is not None:
        if args.warm_only:
            raise ValueError("--warm-only compiles a run; it cannot be combined with --merge")
        merge_only(args.merge)
        return 0
    if args.warm_only and args.distributed:
        raise ValueError("--warm-only runs in one process: JAX writes the compile cache from process 0 only and "
                         "keys it by device; warm each host with a single-process --warm-only instead of "
                         "--distributed")
    needed = ("model", "jobs") if args.warm_only else ("model", "jobs", "out")
    missing = [f"--{n}" for n in needed if getattr(args, n) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --merge DATASET)")
    options = check_model_arguments(args)
    settings = Settings(best_of=args.best_of, min_consistency=args.min_consistency, dtype=args.dtype,
                        batch_size=args.batch_size, critic=args.critic)
    from cosmos_jax.compile_cache import enable as enable_compile_cache

    enable_compile_cache()
    if args.distributed:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        if args.warm_only:
            warm_sdg(args.model, args.jobs, settings, load=lambda: _load(args, options), skip_bad=args.skip_bad)
            return 0
        run_sdg(args.model, args.jobs, args.out, settings, load=lambda: _load(args, options),
                model_options=options.record(), skip_bad=args.skip_bad, progress=not args.no_progress)
    except JobErrors as e:
        for error in e.errors:
            report(error)
        return EXIT_USAGE
    except ImportError as e:
        return report(e)
    return 0


def _load(args: argparse.Namespace, options: ModelOptions) -> Any:
    """The model with its options, on a mesh over this process's own devices when --mesh is given."""
    mesh = rules = None
    if args.mesh is not None:
        import jax

        from cosmos_jax.sharding import load_mesh_preset, make_mesh

        mesh, rules = make_mesh(args.mesh, jax.local_devices()), load_mesh_preset(args.mesh_rules).rules
    return load_pipeline(args, options, mesh=mesh, rules=rules, load_sharded=False)

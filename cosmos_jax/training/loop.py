"""The training loop: data -> sharded train step -> metrics (one step late) -> async checkpoints, resumable."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from cosmos_jax import sharding as sharding_lib
from cosmos_jax.config import Cosmos3Config, load_preset
from cosmos_jax.datasets.normalization import copy_stats_file
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.training import data as data_lib
from cosmos_jax.training import lora as lora_lib
from cosmos_jax.training.checkpoint import TrainCheckpointer, with_shardings
from cosmos_jax.training.losses import LossConfig, TrainBatch
from cosmos_jax.training.metrics import MetricsWriter, peak_flops, train_flops_per_step
from cosmos_jax.training.step import (
    OptimConfig,
    TrainState,
    abstract_state,
    batch_shardings,
    init_state,
    jit_train_step,
    make_optimizer,
    state_shardings,
    train_step_fn,
)

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. `batch` is the global batch; `mesh` a spec like 'fsdp=8' or 'fsdp=4,tensor=2' over all
    devices (None: fsdp over all); a `context` axis > 1 (e.g. 'fsdp=4,context=2') runs the generator attention
    context-parallel, its sequence split over that axis; `rules` the mesh preset (configs/mesh/<rules>.json) whose
    logical-axis rules shard the parameters and activations (cosmos_jax.sharding)."""

    model: str
    data: str
    out: str
    steps: int = 100
    batch: int = 8
    max_text_len: int = 64
    seed: int = 0
    dtype: str = "bfloat16"
    remat: bool = False
    attention: str = "auto"
    mesh: str | None = None
    rules: str = "tiny"
    save_every: int = 50
    keep: int = 3
    skip_bad: bool = False
    task_weights: Mapping[str, float] | None = None
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    lora: lora_lib.LoraConfig | None = None  # train only these adapters (saved to out/lora) on frozen base weights

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.steps < 1 or self.batch < 1 or self.save_every < 1:
            raise ValueError(f"steps, batch and save_every must be >= 1, got {self.steps}, {self.batch}, "
                             f"{self.save_every}")


def model_config(name_or_path: str) -> Cosmos3Config:
    return load_preset(name_or_path)


def _global_batch(batch: TrainBatch, shardings: Any) -> TrainBatch:
    """Host-local numpy rows -> global arrays on the batch shardings (one host: just a placement)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, shardings)


def train(
    run: RunConfig,
    init_params: Callable[[Cosmos3Transformer], Any] | None = None,
    on_step: Callable[[int, TrainState], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume from run.out/checkpoints) up to run.steps. Returns the final state and the last metrics.

    init_params(model) supplies starting weights (default: random init from run.seed); on_step(step, state) is
    called after each step is dispatched (e.g. for tests that inject a failure).
    """
    cfg = model_config(run.model)
    mesh = sharding_lib.make_mesh(run.mesh or f"fsdp={jax.device_count()}")
    rules = sharding_lib.load_mesh_preset(run.rules).rules
    context_parallel = sharding_lib.ActivationSharding(mesh, rules) if mesh.shape["context"] > 1 else None
    model = Cosmos3Transformer(cfg, dtype=DTYPES[run.dtype], param_dtype=jnp.float32, attention=run.attention,
                               remat=run.remat, sharding=context_parallel)
    if run.batch % mesh.size or run.batch % run.optim.grad_accum:
        raise ValueError(f"global batch {run.batch} must be divisible by the {mesh.size} devices and by "
                         f"grad_accum={run.optim.grad_accum}")
    local_batch = run.batch // jax.process_count()
    pipeline = data_lib.PipelineConfig(batch_size=local_batch, max_text_len=run.max_text_len, seed=run.seed,
                                       skip_bad=run.skip_bad, task_weights=run.task_weights)
    loader, meta, bad_log = data_lib.make_loader(run.data, cfg, pipeline)
    iterator = iter(loader)

    checkpointer = TrainCheckpointer(os.path.join(run.out, "checkpoints"), keep=run.keep)
    copy_stats_file(run.data, run.out)  # the action stats travel with the fine-tuned checkpoints
    run_extra: dict[str, Any] = {}
    if run.lora is None:
        abstract, optimizer = abstract_state(model, run.optim)
        param_shardings = sharding_lib.param_shardings(abstract.params, mesh, rules)
    else:
        base = init_params(model) if init_params else model.init(jax.random.key(run.seed))
        base_shardings = sharding_lib.param_shardings(base, mesh, rules)
        base = jax.device_put(base, base_shardings)
        run_extra["lora"] = {"rank": run.lora.rank, "alpha": run.lora.rank * run.lora.scale,
                             "targets": ["/".join(t) for t in run.lora.targets],
                             "base_fingerprint": lora_lib.fingerprint(base)}
        adapters = lora_lib.init_adapters(base, run.lora, jax.random.key(run.seed + 1))
        optimizer = make_optimizer(run.optim, adapters)
        abstract = jax.eval_shape(lambda a: init_state(a, optimizer, run.optim, run.seed), adapters)
        param_shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), adapters)
    shardings = state_shardings(abstract, param_shardings, optimizer, mesh)
    if checkpointer.latest_step is not None:
        saved_lora = checkpointer.restore_extra().get("lora")
        if saved_lora != run_extra.get("lora"):
            raise ValueError(f"{run.out}: the checkpoint's LoRA setup {saved_lora} differs from this run's "
                             f"{run_extra.get('lora')} (base weights, rank, alpha or targets)")
        state, extra = checkpointer.restore(with_shardings(abstract, shardings))
        data_lib.restore_iterator(iterator, extra["data_iterator"])
    elif run.lora is None:
        params = init_params(model) if init_params else model.init(jax.random.key(run.seed))
        state = jax.jit(lambda p: init_state(p, optimizer, run.optim, run.seed), out_shardings=shardings)(params)
    else:
        state = jax.jit(lambda p: init_state(p, optimizer, run.optim, run.seed), out_shardings=shardings)(adapters)

    first = next(iterator)
    example = data_lib.to_train_batch(first)
    global_example = jax.tree.map(lambda x: jax.ShapeDtypeStruct((run.batch,) + x.shape[1:], x.dtype), example)
    b_shardings = batch_shardings(global_example, mesh)
    if run.lora is None:
        step_fn = jit_train_step(train_step_fn(model, optimizer, run.loss, run.optim), shardings, b_shardings, mesh)
    else:
        lora_step = jax.jit(
            lora_lib.lora_train_step_fn(model, optimizer, run.loss, run.optim, run.lora.scale),
            in_shardings=(shardings, b_shardings, base_shardings),
            out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
        step_fn = lambda s, b: lora_step(s, b, base)  # noqa: E731
    text_len, gen_len = example.text.input_ids.shape[1], example.gen.position_ids.shape[2]
    tokens = run.batch * (text_len + gen_len)
    flops = train_flops_per_step(cfg, run.batch, text_len, gen_len, run.optim.freeze_reasoner)
    writer = MetricsWriter(os.path.join(run.out, "metrics"), flops, peak_flops())

    start = int(jax.device_get(state.step))
    bar = tqdm(total=run.steps, initial=start, disable=not progress, desc="train", unit="step")
    rows = first
    last_time = time.perf_counter()
    try:
        for step in range(start, run.steps):
            if step > start:
                rows = next(iterator)
            batch = _global_batch(data_lib.to_train_batch(rows), b_shardings)
            state, metrics = step_fn(state, batch)
            now = time.perf_counter()
            written = writer.push(step + 1, metrics, now - last_time, tokens)
            last_time = now
            if written:
                bar.set_postfix(loss=f"{written['loss/total']:.4f}", tok_s=f"{written['perf/tokens_per_s']:.0f}")
            bar.update(1)
            if on_step is not None:
                on_step(step + 1, state)
            if (step + 1) % run.save_every == 0 or step + 1 == run.steps:
                checkpointer.save(step + 1, state, {"data_iterator": data_lib.iterator_state(iterator),
                                                    "skipped": bad_log.skipped, **run_extra})
    finally:  # on any exit, saves already started are finished and the metrics written so far flushed
        bar.close()
        last = writer.close()
        checkpointer.close()
    if run.lora is not None:
        lora_lib.save_adapters(os.path.join(run.out, "lora"), state.params, run.lora,
                               run_extra["lora"]["base_fingerprint"])
    return {"state": state, "metrics": last, "skipped": list(bad_log.skipped), "model": model, "meta": meta}

"""Memory plans: will a config fit a mesh of devices, for inference or training, before anything runs?

The step is built abstractly (ShapeDtypeStruct parameters and inputs carrying their shardings, nothing
allocated) and compiled ahead of time for the mesh; `memory_analysis()` of the compiled SPMD program gives the
per-device argument, output and temporary bytes. It must run in a process whose jax sees as many devices as the
mesh has (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N, which `cosmos-jax plan` sets for you).

Layers are scanned, so the compiled graph (and its compile time) does not grow with depth and the numbers
cover every layer exactly. The generator attention is compiled as the XLA reference over rematerialised query
chunks (and context-parallel on a `context` axis): the memory profile of a flash kernel, standing in for the
Pallas kernel that runs on GPU/TPU. Temporaries come from XLA:CPU's buffer assignment; GPU/TPU fusion differs.

  infer: one joint forward (both towers), bf16 weights, `batch` samples of the batched generation loop: padded
         up to a multiple of the mesh's `data` axis (as `Cosmos3Pipeline.run_batch` pads them), 2 rows each
         (the two guidance branches), the rows sharded over the logical `batch` axis.
  train: one AdamW step on every parameter: bf16 params + fp32 master copy + two fp32 moments, remat per layer,
         flow-matching MSE on the vision velocity; the state is donated (updated in place).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from cosmos_jax.config import Cosmos3Config
from cosmos_jax.convert.quantize import check_mode, quantize_params
from cosmos_jax.modeling.inputs import GeneratorInputs, TextInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.sharding import (
    ActivationSharding,
    Rules,
    make_mesh,
    mesh_size,
    parse_mesh_spec,
    param_specs,
    replicated_fraction,
    spec_for,
)

GB = 10**9
# Device memory in decimal GB as sold (H100 80GB = 80e9 bytes; a runtime reserves some of it).
DEVICES = {"h100-80g": 80, "h200-141g": 141, "b200-180g": 180, "v5p-95g": 95, "v5e-16g": 16}
TASKS = ("infer", "train")
# 720p, 189 frames: Wan VAE latents (T, H, W) = (48, 46, 80) (16x spatial on 736x1280, 4x temporal), 2x2 patches.
VIDEO_720P_189F = (48, 46, 80)
DEFAULT_TEXT_TOKENS = 300
DEFAULT_QUERY_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one compiled step on a mesh."""

    config_name: str
    mesh: str
    devices: int
    task: str
    batch: int
    gen_tokens: int
    text_tokens: int
    params: int
    optimizer: int
    inputs: int
    outputs: int
    temporaries: int
    aliased: int
    replicated_share: float
    device: str
    compile_seconds: float
    quantize: str | None = None
    offload_reasoner: bool = False
    encode_peak: int = 0  # with offload: the reasoner pass (its tower on device, the generator on host)
    samples: int | None = None  # infer: the samples of the batch (before padding for the data axis)

    @property
    def step_total(self) -> int:
        """Arguments + outputs not aliased to them + temporaries of the planned step."""
        return self.params + self.optimizer + self.inputs + self.outputs - self.aliased + self.temporaries

    @property
    def total(self) -> int:
        """Peak estimate: the step's total (with offload, the larger of it and the reasoner pass)."""
        return max(self.step_total, self.encode_peak)

    @property
    def capacity(self) -> int:
        return DEVICES[self.device] * GB

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def latent_shape_for(tokens: int, patch: int) -> tuple[int, int, int]:
    """A latent (T, H, W) with exactly `tokens` patches: the 720p/189-frame shape for its token count,
    otherwise one frame of patch x (patch * tokens)."""
    t, h, w = VIDEO_720P_189F
    if tokens == t * (h // patch) * (w // patch):
        return VIDEO_720P_189F
    return (1, patch, patch * tokens)


def _sharded_bytes(abstract: Any, specs: Any, mesh) -> int:
    """Per-device bytes of a tree whose leaves are placed by `specs` on `mesh`."""
    leaves = jax.tree.leaves(abstract)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = 0
    for leaf, spec in zip(leaves, spec_leaves):
        ways = 1
        for entry in spec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                ways *= mesh.shape[axis]
        total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize // ways
    return total


def _struct(shape: tuple[int, ...], dtype: Any, names: tuple[str | None, ...], mesh, rules: Rules):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec_for(shape, names, rules, mesh)))


def _abstract_inputs(cfg: Cosmos3Config, batch: int, text_tokens: int, latent: tuple[int, int, int], dtype: Any,
                     mesh, rules: Rules) -> tuple[TextInputs, GeneratorInputs]:
    """Inputs with the batch axis sharded; a video of `latent` (T, H, W), no sound or action rows."""
    tokens = latent[0] * (latent[1] // cfg.latent_patch_size) * (latent[2] // cfg.latent_patch_size)
    b = lambda *rest: ("batch",) + (None,) * len(rest)  # noqa: E731
    s = lambda shape, dt: _struct(shape, dt, b(*shape[1:]), mesh, rules)  # noqa: E731
    text = TextInputs(
        input_ids=s((batch, text_tokens), jnp.int32),
        und_len=s((batch,), jnp.int32),
        position_ids=s((batch, 3, text_tokens), jnp.float32),
    )
    gen = GeneratorInputs(
        position_ids=s((batch, 3, tokens), jnp.float32),
        vision=s((batch, cfg.latent_channel, *latent), dtype),
        vision_noisy=s((batch, latent[0]), jnp.bool_),
        vision_t=s((batch,), jnp.float32),
    )
    return text, gen


def _with_shardings(abstract: Any, specs: Any, mesh, dtype: Any = None) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=NamedSharding(mesh, s)),
        abstract, specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or hasattr(x, "shape"),
    )


def _quantized_structs(abstract: Any, mesh, rules: Rules, mode: str) -> Any:
    """The parameter structs after `quantize_params(mode)`, placed as `generate --quantize --mesh` places them:
    values take their kernel's spec, a scale the same with its size-1 (reduced) axes unsharded
    (`cosmos_jax.sharding.param_logical_axes`)."""
    quantized = jax.eval_shape(lambda p: quantize_params(p, mode), abstract)
    return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        param_specs(quantized, mesh, rules), quantized, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _placed_bytes(structs: Any) -> int:
    """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(structs))


def _train_step(model: Cosmos3Transformer, optimizer: optax.GradientTransformation):
    def step(
        state: dict[str, Any], text: TextInputs, gen: GeneratorInputs, target: jax.Array
    ) -> tuple[dict[str, Any], jax.Array]:
        def loss_fn(params: Any) -> jax.Array:
            out = model(params, text, gen)
            return jnp.mean(jnp.square(out.vision.astype(jnp.float32) - target.astype(jnp.float32)))

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, opt_state = optimizer.update(grads, state["opt"], state["master"])
        master = optax.apply_updates(state["master"], updates)
        params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, state["params"])
        return {"params": params, "master": master, "opt": opt_state}, loss

    return step


def plan_memory(
    cfg: Cosmos3Config,
    config_name: str,
    mesh_spec: str,
    rules: Rules,
    task: str,
    *,
    gen_tokens: int,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    batch: int | None = None,
    device: str = "h100-80g",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    quantize: str | None = None,
    offload_reasoner: bool = False,
) -> MemoryPlan:
    """Compile one sharded step abstractly and return its per-device memory plan (quantize: None, "int8" or
    "fp8" weight-only, inference only)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_mode(quantize)
    if quantize is not None and task != "infer":
        raise ValueError("--quantize plans inference only (training keeps full-precision weights)")
    if offload_reasoner and task != "infer":
        raise ValueError("--offload-reasoner plans inference only")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; devices: {', '.join(DEVICES)}")
    for name, value in (("gen_tokens", gen_tokens), ("text_tokens", text_tokens), ("query_chunk", query_chunk)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    mesh = make_mesh(mesh_spec, jax.devices()[: mesh_size(mesh_spec)])
    if batch is not None and batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    samples = None
    if task == "infer":
        samples = 1 if batch is None else batch
        batch = 2 * (-(-samples // mesh.shape["data"]) * mesh.shape["data"])
    elif batch is None:
        batch = mesh.shape["data"] * mesh.shape["fsdp"]
    sharding = ActivationSharding(mesh, rules, query_chunk=query_chunk)
    model = Cosmos3Transformer(cfg, dtype=jnp.bfloat16, attention="xla", remat=task == "train", sharding=sharding)
    abstract = model.abstract_params()
    specs = param_specs(abstract, mesh, rules)
    params = _with_shardings(abstract, specs, mesh) if quantize is None else \
        _quantized_structs(abstract, mesh, rules, quantize)
    latent = latent_shape_for(gen_tokens, cfg.latent_patch_size)
    text, gen = _abstract_inputs(cfg, batch, text_tokens, latent, model.dtype, mesh, rules)
    optimizer_bytes = 0
    encode_peak = 0
    start = time.perf_counter()
    if task == "infer" and offload_reasoner:
        reasoner_pass = {"reasoner": params["reasoner"],
                         "generator": {"layers": {k: v for k, v in params["generator"]["layers"].items()
                                                  if k == "und_k_norm"}}}
        encode = jax.jit(lambda p, t: model.encode_reasoner(p, t)[0]).lower(reasoner_pass, text).compile()
        analysis = encode.memory_analysis()
        encode_peak = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
        cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(lambda p, t: model.encode_reasoner(p, t)[0], reasoner_pass, text),
                             encode.output_shardings)
        params = {"generator": params["generator"]}
        lowered = jax.jit(model.denoise_step).lower(params, cache, gen)
    elif task == "infer":
        lowered = jax.jit(model.__call__).lower(params, text, gen)
    else:
        optimizer = optax.adamw(1e-5)
        master = _with_shardings(abstract, specs, mesh, jnp.float32)
        opt_state = jax.eval_shape(optimizer.init, master)
        opt_specs = _opt_specs(opt_state, specs)
        opt_state = _with_shardings(opt_state, opt_specs, mesh)
        state = {"params": params, "master": master, "opt": opt_state}
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        optimizer_bytes = _sharded_bytes(master, specs, mesh) + _sharded_bytes(opt_state, opt_specs, mesh)
        target = gen.vision
        lowered = jax.jit(
            _train_step(model, optimizer), out_shardings=(state_shardings, None), donate_argnums=0
        ).lower(state, text, gen, target)
    analysis = lowered.compile().memory_analysis()
    seconds = time.perf_counter() - start
    params_bytes = _placed_bytes(params) if task == "infer" else _sharded_bytes(abstract, specs, mesh)
    arguments = int(analysis.argument_size_in_bytes)
    return MemoryPlan(
        config_name=config_name,
        mesh=mesh_spec,
        devices=mesh.size,
        task=task,
        batch=batch,
        samples=samples,
        gen_tokens=gen_tokens,
        text_tokens=text_tokens,
        params=params_bytes,
        optimizer=optimizer_bytes,
        inputs=max(arguments - params_bytes - optimizer_bytes, 0),
        outputs=int(analysis.output_size_in_bytes),
        temporaries=int(analysis.temp_size_in_bytes),
        aliased=int(analysis.alias_size_in_bytes),
        replicated_share=replicated_fraction(abstract, mesh, rules),
        device=device,
        compile_seconds=seconds,
        quantize=quantize,
        offload_reasoner=offload_reasoner,
        encode_peak=encode_peak,
    )


def _opt_specs(opt_state: Any, param_spec_tree: Any) -> Any:
    """AdamW's moments take the parameters' specs; its step counters are replicated."""
    param_treedef = jax.tree.structure(param_spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))

    def specs_for(node: Any) -> Any:
        if jax.tree.structure(node) == param_treedef:
            return param_spec_tree
        return jax.tree.map(lambda _: PartitionSpec(), node)

    return jax.tree.map(specs_for, opt_state, is_leaf=lambda n: jax.tree.structure(n) == param_treedef)


def _weights_label(quantize: str | None) -> str:
    if quantize is None:
        return "parameters (bf16; time embedder fp32)"
    return f"parameters (layer linears {quantize}, rest bf16)"


def _samples_note(plan: MemoryPlan) -> str:
    """' rows (3 samples, padded to 4 for data=2; 2 guidance rows each; 4 rows per data shard)' for infer."""
    if plan.samples is None:
        return ""
    data = parse_mesh_spec(plan.mesh)["data"]
    padded = plan.batch // 2
    pad = f", padded to {padded} for data={data}" if padded != plan.samples else ""
    return (f" rows ({plan.samples} sample{'s' if plan.samples != 1 else ''}{pad}; 2 guidance rows each; "
            f"{plan.batch // data} rows per data shard)")


def format_plan(plan: MemoryPlan) -> str:
    """A human-readable report of a plan."""
    gib = lambda n: f"{n / GB:9.2f} GB"  # noqa: E731
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines = [
        f"plan: {plan.config_name}  task={plan.task}  mesh={plan.mesh} ({plan.devices} devices)",
        f"  batch={plan.batch}{_samples_note(plan)}  generator tokens={plan.gen_tokens}  "
        f"text tokens={plan.text_tokens}",
        "  per-device bytes (all layers: scanned, so exact for the full depth):",
        f"    {_weights_label(plan.quantize):<42}{gib(plan.params)}",
        f"    optimizer state (fp32 master + 2 moments) {gib(plan.optimizer)}",
        f"    inputs                                    {gib(plan.inputs)}",
        f"    outputs (less donated/aliased)            {gib(plan.outputs - plan.aliased)}",
        f"    activations / temporaries                 {gib(plan.temporaries)}",
        *([f"    denoising step total (generator + cache) {gib(plan.step_total)}",
           f"    reasoner pass (its tower on device)      {gib(plan.encode_peak)}"] if plan.offload_reasoner else []),
        f"    total{' (peak of the two)' if plan.offload_reasoner else '                 '}                    "
        f"{gib(plan.total)}",
        f"  parameters left replicated: {plan.replicated_share:.4%} of parameter bytes"
        + (" (a single device holds everything)" if plan.devices == 1 else ""),
        f"  {plan.device}: {verdict} ({plan.total / plan.capacity:.0%} of {DEVICES[plan.device]} GB)",
        f"  compiled for XLA:CPU in {plan.compile_seconds:.1f} s; attention = XLA reference in rematerialised query "
        "chunks (flash-like memory) standing in for the Pallas kernel; GPU/TPU temporaries differ.",
    ]
    return "\n".join(lines)

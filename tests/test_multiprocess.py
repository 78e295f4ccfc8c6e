"""Two CPU processes joined by jax.distributed (coordinator on 127.0.0.1), 4 fake devices each: a tiny
checkpoint loaded sharded over all 8 devices (each process reads only its own devices' slices) and one joint
forward, equal to the single-process forward.

Tolerance: fp32; max abs error <= 2e-5 of the output's max abs value (the sharded matmuls sum in another order).
Run as a script (`python tests/test_multiprocess.py WORKDIR PORT PROCESS_ID`), this file is the worker.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from multiprocess_helpers import start_workers, wait_workers

MESH = "fsdp=2,context=2,tensor=2"
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
REL_TOL = 2e-5
TIMEOUT_S = 300


def _inputs(cfg):
    """A batch of 2 rows as numpy: (TextInputs, GeneratorInputs); Lg = 3*2*2 vision + 4 action = 16 tokens."""
    from cosmos_jax.modeling.inputs import GeneratorInputs
    from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence

    rng = np.random.default_rng(7)
    latent, actions = (3, 4, 4), 4
    layouts = [layout_sequence(cfg, n, latent, fps=24.0, clean_vision_frames=[0], action_len=actions) for n in (6, 4)]
    text = batch_text([rng.integers(0, cfg.vocab_size, size=n) for n in (6, 4)], layouts)
    gen = GeneratorInputs(
        position_ids=batch_generator_positions(layouts),
        vision=rng.standard_normal((2, cfg.latent_channel, *latent)).astype(np.float32),
        vision_noisy=np.stack([lay.vision_noisy for lay in layouts]),
        vision_t=np.array([900.0, 300.0], np.float32),
        action=rng.standard_normal((2, actions, cfg.action_dim)).astype(np.float32),
        action_noisy=np.stack([lay.action_noisy for lay in layouts]),
        action_t=np.array([900.0, 300.0], np.float32),
        action_domain=np.array([1, 3], np.int32),
    )
    return text, gen


def _model(sharding=None):
    import jax.numpy as jnp

    from cosmos_jax.config import load_preset
    from cosmos_jax.modeling.transformer import Cosmos3Transformer

    return Cosmos3Transformer(load_preset("tiny"), dtype=jnp.float32, attention="xla", sharding=sharding)


# ------------------------------------------------------------------------------------------------ worker


def _load_sharded(folder: Path, model, mesh, rules):
    """Both parameter trees as global arrays, each process reading only its devices' slices; also the bytes read."""
    from cosmos_jax.convert.keymap_transformer import key_table
    from cosmos_jax.convert.safetensors_io import CheckpointIndex, make_sharded_array
    from cosmos_jax.sharding import param_shardings

    abstract = model.abstract_params()
    shardings = param_shardings(abstract, mesh, rules)
    index = CheckpointIndex.open(folder)
    read_bytes = [0]
    read_slice = index.read_slice

    def counting_read_slice(key, idx):
        block = read_slice(key, idx)
        read_bytes[0] += block.nbytes
        return block

    index.read_slice = counting_read_slice
    params: dict = {}
    layers = model.config.num_hidden_layers
    for entry in key_table(model.config):
        sharding, leaf = shardings, abstract
        for name in entry.path:
            sharding, leaf = sharding[name], leaf[name]
        transform = entry.layout(leaf.shape[1:] if entry.per_layer else leaf.shape)
        keys = entry.torch_keys(layers)
        node = params
        for name in entry.path[:-1]:
            node = node.setdefault(name, {})
        node[entry.path[-1]] = make_sharded_array(index, keys if entry.per_layer else keys[0], sharding, transform)
    return params, read_bytes[0], sum(index.nbytes(k) for k in index.keys())


def _global(x, mesh, rules):
    import jax
    from jax.sharding import NamedSharding

    from cosmos_jax.sharding import spec_for

    if x is None:
        return None
    names = ("batch",) + (None,) * (x.ndim - 1)
    sharding = NamedSharding(mesh, spec_for(x.shape, names, rules, mesh))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def worker(workdir: Path, port: int, process_id: int) -> None:
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id, initialization_timeout=120)
    from jax.sharding import NamedSharding, PartitionSpec

    from cosmos_jax.sharding import ActivationSharding, load_mesh_preset, make_mesh

    assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES and jax.local_device_count() == LOCAL_DEVICES
    rules = load_mesh_preset("tiny").rules
    mesh = make_mesh(MESH)
    model = _model(ActivationSharding(mesh, rules))
    params, read, total = _load_sharded(workdir / "checkpoint", model, mesh, rules)
    text, gen = (jax.tree.map(lambda x: _global(x, mesh, rules), t) for t in _inputs(model.config))
    replicated = NamedSharding(mesh, PartitionSpec())
    out = jax.jit(model.__call__, out_shardings=replicated)(params, text, gen)
    np.savez(workdir / f"out_{process_id}.npz", vision=np.asarray(out.vision.addressable_data(0)),
             action=np.asarray(out.action.addressable_data(0)), read=read, total=total)
    jax.distributed.shutdown()


# ------------------------------------------------------------------------------------------------- test


def test_two_processes_load_shards_and_match_single_process_forward(tmp_path: Path) -> None:
    import jax

    from cosmos_jax.convert.keymap_transformer import torch_state_from_params
    from cosmos_jax.convert.safetensors_io import write_checkpoint

    model = _model()
    params = jax.jit(model.init)(jax.random.key(11))
    write_checkpoint(tmp_path / "checkpoint", torch_state_from_params(params, model.config), max_shard_bytes=200_000)
    assert len(list((tmp_path / "checkpoint").glob("*.safetensors"))) > 1
    want = jax.jit(model.__call__)(params, *_inputs(model.config))

    procs = start_workers(__file__, tmp_path, NUM_PROCESSES, LOCAL_DEVICES)
    wait_workers(procs, TIMEOUT_S)

    for i in range(NUM_PROCESSES):
        got = np.load(tmp_path / f"out_{i}.npz")
        for name in ("vision", "action"):
            w = np.asarray(getattr(want, name))
            err = float(np.abs(got[name] - w).max() / np.abs(w).max())
            assert err <= REL_TOL, f"process {i} {name}: relative max error {err:.3g}"
        # Each process holds half of every sharded tensor: it must read far less than the whole checkpoint.
        assert 0 < got["read"] < 0.75 * got["total"], f"process {i} read {got['read']} of {got['total']} bytes"


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

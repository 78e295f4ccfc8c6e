"""Memory plans (cosmos_jax/plan.py, `cosmos-jax plan`) for the tiny config on small fake CPU meshes.

Parameter and optimizer bytes are exact (sharded leaf sizes); temporaries come from XLA's memory_analysis and
are only checked to be positive and smaller than a generous bound.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cosmos_jax.config import load_preset
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.plan import format_plan, latent_shape_for, plan_memory
from cosmos_jax.sharding import load_mesh_preset

RULES = load_mesh_preset("tiny").rules


def _total_bytes(tree, dtype=None) -> int:
    return sum(math.prod(x.shape) * np.dtype(dtype or x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_train_plan_counts_params_and_adamw_state_per_device():
    cfg = load_preset("tiny")
    plan = plan_memory(cfg, "tiny", "fsdp=2,tensor=2", RULES, "train", gen_tokens=64, text_tokens=8, query_chunk=16)
    abstract = Cosmos3Transformer(cfg).abstract_params()
    full = _total_bytes(abstract)
    # Every big tiny tensor splits 4 ways; a few small ones (norm scales, 64-wide action heads) do not.
    assert full / 4 < plan.params < full / 2
    assert plan.devices == 4 and plan.batch == 2
    master = _total_bytes(abstract, np.float32)
    assert 3 * master / 4 < plan.optimizer < 3 * master / 2  # fp32 master + two fp32 moments, sharded
    assert 0 < plan.temporaries < 1e9
    assert plan.aliased > 0  # the state is donated
    assert plan.fits and 0 < plan.replicated_share < 0.05


def test_plan_rejects_bad_requests():
    cfg = load_preset("tiny")
    with pytest.raises(ValueError, match="task must be one of"):
        plan_memory(cfg, "tiny", "fsdp=2", RULES, "serve", gen_tokens=8)
    with pytest.raises(ValueError, match="unknown device 'a100'"):
        plan_memory(cfg, "tiny", "fsdp=2", RULES, "infer", gen_tokens=8, device="a100")
    with pytest.raises(ValueError, match="gen_tokens must be a positive integer"):
        plan_memory(cfg, "tiny", "fsdp=2", RULES, "infer", gen_tokens=0)


def test_latent_shape_for_720p_and_other_token_counts():
    assert latent_shape_for(44160, 2) == (48, 46, 80)
    t, h, w = latent_shape_for(1000, 2)
    assert t * (h // 2) * (w // 2) == 1000


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "cosmos_jax.cli", "plan", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_reexecs_on_a_fake_mesh_of_the_right_size():
    done = _cli("--config", "tiny", "--mesh", "fsdp=2,context=2", "--tokens", "64", "--text-tokens", "8",
                "--device", "v5e-16g")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mesh=fsdp=2,context=2 (4 devices)" in done.stdout
    assert "v5e-16g: FITS" in done.stdout


def test_cli_reports_bad_mesh_and_config_clearly():
    done = _cli("--config", "tiny", "--mesh", "fsdp=2,model=4")
    assert done.returncode == 2 and "unknown axis 'model'" in done.stderr
    done = _cli("--config", "no-such-preset", "--mesh", "fsdp=2")
    assert done.returncode == 2 and "unknown preset" in done.stderr


def test_quantized_and_offloaded_plans_count_their_bytes():
    from cosmos_jax.convert.quantize import quantize_params, tree_bytes

    cfg = load_preset("tiny")
    kwargs = dict(gen_tokens=64, text_tokens=8, query_chunk=16)
    full = plan_memory(cfg, "tiny", "data=1", RULES, "infer", **kwargs)
    int8 = plan_memory(cfg, "tiny", "data=1", RULES, "infer", quantize="int8", **kwargs)
    abstract = Cosmos3Transformer(cfg).abstract_params()
    assert full.params == _total_bytes(abstract)
    assert int8.params == tree_bytes(jax.eval_shape(lambda p: quantize_params(p, "int8"), abstract)) < full.params
    off = plan_memory(cfg, "tiny", "data=1", RULES, "infer", offload_reasoner=True, **kwargs)
    assert off.params == _total_bytes(abstract["generator"])  # the loop holds only the generator tower
    assert off.encode_peak > _total_bytes(abstract["reasoner"]) and off.total == max(off.step_total, off.encode_peak)
    with pytest.raises(ValueError, match="--quantize plans inference only"):
        plan_memory(cfg, "tiny", "data=1", RULES, "train", quantize="fp8", **kwargs)
    with pytest.raises(ValueError, match="--quantize 'int4': choose one of int8, fp8"):
        plan_memory(cfg, "tiny", "data=1", RULES, "infer", quantize="int4", **kwargs)


def test_infer_plan_counts_samples_padded_for_the_data_axis():
    """--batch 3 on data=2: padded to 4 samples = 8 rows (2 guidance rows each), 4 rows per data shard; the
    per-device inputs are those 4 rows, half of what one device holds for the same batch."""
    cfg = load_preset("tiny")
    kwargs = dict(gen_tokens=64, text_tokens=8, query_chunk=16)
    sharded = plan_memory(cfg, "tiny", "data=2,tensor=2", RULES, "infer", batch=3, **kwargs)
    assert (sharded.samples, sharded.batch) == (3, 8)
    one = plan_memory(cfg, "tiny", "tensor=2", RULES, "infer", batch=4, **kwargs)
    assert (one.samples, one.batch) == (4, 8)
    assert sharded.inputs * 2 == one.inputs
    assert "batch=8 rows (3 samples, padded to 4 for data=2; 2 guidance rows each; 4 rows per data shard)" in \
        format_plan(sharded)
    default = plan_memory(cfg, "tiny", "tensor=2", RULES, "infer", **kwargs)
    assert (default.samples, default.batch) == (1, 2)

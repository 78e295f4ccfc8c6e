"""The LoRA-vs-full fine-tune experiment on the pushed-disc world (tools/lora_synthetic_world.py): the action
regimes' control laws, a two-step LoRA fine-tune whose optimizer state is the adapters' alone (and is what the
tool counts), and the gain-recovered arithmetic. The experiment itself is a benchmark (BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tools")
sys.path.insert(0, TOOLS)

import lora_synthetic_world as tool  # noqa: E402
import synthetic_world as world  # noqa: E402

CENTROID_TOL = 0.1  # px: the intensity centroid of a pixelised radius-2.5 disc sits within ~0.05 px of its centre
TINY = {**world.MODEL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "rope_axes_dim": [4, 2, 2]}


def _centroid(frame: np.ndarray) -> np.ndarray:
    weight = frame.sum(axis=-1)
    yy, xx = np.mgrid[0 : world.SIZE, 0 : world.SIZE] + 0.5
    return np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()


def test_regime_b_turns_the_controls_a_quarter_turn():
    pushes = np.array([[0.5, 0.0], [0.0, -0.25], [1.0, 1.0]])
    np.testing.assert_array_equal(world.displacement(pushes, "A"), [[1.0, 0.0], [0.0, -0.5], [2.0, 2.0]])
    np.testing.assert_array_equal(world.displacement(pushes, "B"), [[0.0, 1.0], [0.5, 0.0], [-2.0, 2.0]])
    with pytest.raises(ValueError, match="unknown action regime 'C'"):
        world.displacement(pushes, "C")
    # same draws, same pushes and first frame; the disc follows PUSH·(−a_y, a_x) in B, PUSH·a in A
    moved = 0
    for seed in range(20):
        frames_a, pushes_a = world.rollout(np.random.default_rng(seed), "A")
        frames_b, pushes_b = world.rollout(np.random.default_rng(seed), "B")
        np.testing.assert_array_equal(pushes_a, pushes_b)
        np.testing.assert_array_equal(frames_a[0], frames_b[0])
        for frames, law in ((frames_a, lambda a: 2.0 * a), (frames_b, lambda a: 2.0 * np.array([-a[1], a[0]]))):
            centroids = np.stack([_centroid(f) for f in frames])
            for step, push in enumerate(pushes_a):
                target = centroids[step] + law(push)
                if np.all((target > world.RADIUS + 0.5) & (target < world.SIZE - world.RADIUS - 0.5)):
                    np.testing.assert_allclose(centroids[step + 1] - centroids[step], law(push), atol=CENTROID_TOL)
                    moved += 1
    assert moved > 60


def test_gain_recovered_arithmetic():
    assert tool.gain_recovered(0.5, 0.1, 0.2) == pytest.approx(0.75)
    assert tool.gain_recovered(0.5, 0.1, 0.1) == pytest.approx(1.0)
    assert tool.gain_recovered(0.5, 0.1, 0.6) == pytest.approx(-0.25)  # worse than the base
    assert tool.gain_recovered(0.3, 0.3, 0.2) is None  # the full fine-tune did not move the metric


def test_parse_variant():
    config = tool.parse_variant("4:q_proj,down_proj")
    assert config.rank == 4 and config.targets == (("generator", "layers", "q_proj", "kernel"),
                                                  ("generator", "layers", "mlp", "down_proj", "kernel"))
    with pytest.raises(ValueError, match="--lora 'q_proj': write RANK:TARGETS"):
        tool.parse_variant("q_proj")
    with pytest.raises(ValueError, match="--lora-targets 'qkv'"):
        tool.parse_variant("4:qkv")


FINETUNE_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[2])
import lora_synthetic_world as tool
import synthetic_world as world
from cosmos_jax.config import Cosmos3Config
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.training import lora as lora_lib
root = sys.argv[1]
world.write_world(root + "/data", 8, seed=0, regime="B")
cfg = Cosmos3Config(**json.loads(sys.argv[3]))
cfg.to_json(root + "/model.json")
base = Cosmos3Transformer(cfg, param_dtype=jnp.float32).init(jax.random.key(0))
tuned = tool.finetune(root + "/model.json", root + "/data", root + "/lora", base,
                      world.Experiment(steps=2, batch=2, lr=1e-2, seed=0), lora=tool.parse_variant("2:q_proj,v_proj"))
def leaves(tree):
    return [["/".join(str(k.key) for k in keys if isinstance(k, jax.tree_util.DictKey)), list(x.shape), str(x.dtype)]
            for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
base_leaves = dict(jax.tree_util.tree_flatten_with_path(base)[0])
changed = ["/".join(k.key for k in keys) for keys, x in jax.tree_util.tree_flatten_with_path(tuned["params"])[0]
           if not np.array_equal(np.asarray(x), np.asarray(base_leaves[keys]))]
b = tuned["state"].params["generator"]["layers"]["q_proj"]["kernel"]["b"]
print("FACTS", json.dumps({"adapters": leaves(tuned["state"].params), "opt": leaves(tuned["state"].opt_state),
      "sizes": tuned["sizes"], "opt_bytes": tool.tree_bytes(tuned["state"].opt_state), "changed": changed,
      "b_max": float(jnp.abs(b).max()),
      "fingerprint_ok": lora_lib.load_adapters(root + "/lora/lora").base_fingerprint == lora_lib.fingerprint(base)}))
"""


@pytest.mark.slow  # a tiny train step compiled in a subprocess: 20 s at load ~4, 3 min at load 10
def test_lora_finetune_optimizer_state_holds_only_the_adapters(tmp_path):
    """Two LoRA steps (rank 2 on q/v of a 1-layer, width-32 model) from a random base on 8 regime-B clips, in a
    one-device process (the tool's runs use mesh fsdp=1)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-c", FINETUNE_SCRIPT, str(tmp_path), TOOLS, json.dumps(TINY)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("FACTS"))[6:])
    # q: a [1, 32, 2] + b [1, 2, 32]; v (one 16-wide kv head): a [1, 32, 2] + b [1, 2, 16]
    q, v = "generator/layers/q_proj/kernel", "generator/layers/v_proj/kernel"
    adapters = [[f"{q}/a", [1, 32, 2], "float32"], [f"{q}/b", [1, 2, 32], "float32"],
                [f"{v}/a", [1, 32, 2], "float32"], [f"{v}/b", [1, 2, 16], "float32"]]
    assert facts["adapters"] == adapters
    assert facts["sizes"]["trainable_parameters"] == 2 * (32 + 32) + 2 * (32 + 16) == 224
    moments = [leaf for leaf in facts["opt"] if leaf[1]]
    counters = [leaf for leaf in facts["opt"] if not leaf[1]]
    trained = [[f"train/{path}", shape, dtype] for path, shape, dtype in adapters]  # multi_transform's label
    assert moments == trained + trained  # Adam's mu and nu, keyed and shaped like the adapters, nothing else
    assert counters and all(dtype == "int32" for _, _, dtype in counters)
    assert facts["sizes"]["optimizer_bytes"] == facts["opt_bytes"] == 2 * 4 * 224 + 4 * len(counters)
    # trained from b = 0, merged for evaluation: only the adapted kernels differ from the base
    assert facts["b_max"] > 0
    assert facts["changed"] == [q, v]
    assert facts["fingerprint_ok"]

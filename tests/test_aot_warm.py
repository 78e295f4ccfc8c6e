"""Warming the compile cache ahead of time (`cosmos_jax.aot`, `sdg --warm-only`, `generate --warm-only`).

Pinned: under `compile_only()` a jitted call compiles once per argument signature and returns zeros shaped,
typed and sharded like its outputs without running; a fresh process calling the same function for real then
loads it from the persistent cache (0 misses). End to end (slow): `sdg --warm-only` on a jobs file writes the
same programs a cold `sdg --critic` run writes, and nothing into the dataset folder; the real run after it compiles
nothing (every request a cache hit, the folder unchanged) and makes the dataset a run without warming makes.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax import aot, compile_cache

REPO = Path(__file__).resolve().parents[1]
_EVENTS = {"requests": "/jax/compilation_cache/compile_requests_use_cache",
           "hits": "/jax/compilation_cache/cache_hits", "misses": "/jax/compilation_cache/cache_misses"}


def test_outside_compile_only_call_runs_the_function():
    f = jax.jit(lambda x: x + 1)
    np.testing.assert_array_equal(aot.call("f", f, jnp.arange(3.0)), [1.0, 2.0, 3.0])
    assert aot.warming() is None


def test_compile_only_compiles_once_per_signature_and_returns_zeros_without_running():
    f = jax.jit(lambda x, y: (x * 2 + 1, (y.astype(jnp.int32), x.sum())))
    seen = []
    with aot.compile_only(on_compiled=seen.append) as warming:
        assert aot.warming() is warming
        out = aot.call("f 3", f, jnp.ones(3), jnp.ones((2, 2)))
        again = aot.call("f 3 again", f, jnp.full(3, 5.0), jnp.zeros((2, 2)))
        other = aot.call("f 4", f, jnp.ones(4), jnp.ones((2, 2)))
    assert aot.warming() is None
    assert [c.label for c in warming.compiled] == ["f 3", "f 4"] == [c.label for c in seen]
    assert all(c.seconds > 0 for c in warming.compiled)
    assert warming.seconds == pytest.approx(sum(c.seconds for c in warming.compiled))
    assert warming.summary().startswith("2 programs (")
    for result in (out, again):
        first, (cast, total) = result
        assert first.shape == (3,) and first.dtype == jnp.float32 and not np.any(np.asarray(first))
        assert cast.shape == (2, 2) and cast.dtype == jnp.int32 and not np.any(np.asarray(cast))
        assert total.shape == () and float(total) == 0.0
        assert first.sharding == jax.jit(lambda x: x)(jnp.ones(3)).sharding
    assert other[0].shape == (4,)


@pytest.mark.parametrize("committed", [False, True])
def test_the_zeros_are_committed_as_the_real_outputs_would_be(committed):
    f = jax.jit(lambda x: x * 3)
    x = jax.device_put(np.ones(3, np.float32), jax.devices()[0] if committed else None)
    with aot.compile_only():
        zeros = aot.call("f", f, x)
    real = f(x)
    assert zeros.committed == real.committed == committed
    assert zeros.sharding == real.sharding


def test_execute_records_a_compiled_program_once_and_runs_it_outside():
    compiled = jax.jit(lambda x: x - 1).lower(jnp.ones(2)).compile()
    np.testing.assert_array_equal(aot.execute("g", compiled, 0.5, False, jnp.ones(2)), [0.0, 0.0])
    with aot.compile_only() as warming:
        out = aot.execute("g", compiled, 0.5, False, jnp.full(2, 7.0))
        aot.execute("g", compiled, 0.5, False, jnp.full(2, 7.0))
    assert [(c.label, c.seconds, c.cached) for c in warming.compiled] == [("g", 0.5, False)]
    np.testing.assert_array_equal(out, [0.0, 0.0])
    assert warming.compiled[0].line() == "compiled g: 0.50s"


# A jitted function warmed (mode "warm") or called for real ("run") in a fresh process, counting cache events.
_TOY = """
import collections, json, sys
import jax, jax.numpy as jnp
from jax import monitoring
from cosmos_jax import aot, compile_cache
events = collections.Counter()
monitoring.register_event_listener(lambda name, **kw: events.update([name]))
compile_cache.enable()
f = jax.jit(lambda x, n: jnp.cumsum(jnp.sin(x) * n), static_argnums=1)
x = jnp.linspace(0.0, 1.0, 17)
if sys.argv[1] == "warm":
    with aot.compile_only() as warming:
        out = aot.call("toy", f, x, 3)
    cached = [c.cached for c in warming.compiled]
else:
    out, cached = f(x, 3), None
print(json.dumps({"sum": float(out.sum()), "cached": cached, **{k: events[v] for k, v in %r.items()}}))
""" % (_EVENTS,)


def _toy(mode: str, cache: Path) -> dict:
    env = {**os.environ, compile_cache.ENV: str(cache), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _TOY, mode], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_warmed_function_is_a_cache_hit_when_a_fresh_process_calls_it(tmp_path):
    cache = tmp_path / "jax-cache"
    warm = _toy("warm", cache)
    assert warm["sum"] == 0.0 and warm["cached"] == [False] and warm["misses"] >= 1
    entries = sorted(os.listdir(cache))
    rewarm = _toy("warm", cache)
    assert rewarm["cached"] == [True] and rewarm["misses"] == 0
    run = _toy("run", cache)
    assert run["misses"] == 0 and run["hits"] == run["requests"] >= 1
    assert sorted(os.listdir(cache)) == entries
    x = np.linspace(0.0, 1.0, 17, dtype=np.float32)
    assert run["sum"] == pytest.approx(float(np.cumsum(np.sin(x) * 3).sum()), rel=1e-5)


# ------------------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize("args, words", [
    (["sdg", "--model", ".", "--jobs", "j.jsonl", "--warm-only", "--distributed"], "--warm-only runs in one process"),
    (["sdg", "--merge", "x", "--warm-only"], "cannot be combined with --merge"),
    (["sdg", "--warm-only", "--jobs", "j.jsonl"], "--model required"),
])
def test_sdg_warm_only_refuses_what_it_cannot_warm(args, words, capsys):
    from cosmos_jax import cli

    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and words in err


def test_generate_warm_only_needs_no_progress(tmp_path, capsys):
    from cosmos_jax import cli

    model = tmp_path / "model"
    model.mkdir()
    assert cli.main(["generate", "--model", str(model), "--prompt", "p", "--output", str(tmp_path / "o.mp4"),
                     "--warm-only"]) == 2
    assert capsys.readouterr().err.startswith("error: --warm-only needs --no-progress")
    assert sorted(os.listdir(tmp_path)) == ["model"]


# sdg in a fresh process, counting JAX's compilation-cache events (the last stdout line).
_SDG = """
import collections, json, sys
from jax import monitoring
events = collections.Counter()
monitoring.register_event_listener(lambda name, **kw: events.update([name]))
from cosmos_jax.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, **{k: events[v] for k, v in %r.items()}}))
""" % (_EVENTS,)


def _start_sdg(args: list[str], cache: Path) -> subprocess.Popen:
    env = {**os.environ, compile_cache.ENV: str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _SDG, "sdg", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    """(the cache-event counts, stderr) of a finished sdg process."""
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["rc"] == 0, err[-3000:]
    return counts, err


def _programs(cache: Path) -> collections.Counter:
    """How many entries of each program (module name) a cache folder holds."""
    return collections.Counter(name.split("-")[0] for name in os.listdir(cache))


@pytest.mark.slow
def test_sdg_warm_only_then_the_run_compiles_nothing_and_makes_the_same_dataset(tmp_path):
    from test_sdg import assert_same_dataset
    from test_sdg_critic import add_vision_reasoner

    from cosmos_jax.demo import build_demo_checkpoint, demo_image

    checkpoint = add_vision_reasoner(build_demo_checkpoint(tmp_path / "checkpoint"))
    demo_image(32, 32).save(tmp_path / "frame.png")
    job = {"id": "pol", "mode": "policy", "prompt": "pick", "chunk": 4, "seed": 0, "image": "frame.png",
           "domain": "bridge_orig_lerobot", "resolution_tier": 256, "steps": 2, "fps": 8}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(job) + "\n")
    common = ["--model", str(checkpoint), "--jobs", str(jobs), "--dtype", "float32", "--attention", "xla",
              "--critic", "--no-progress"]

    cold_cache, warm_cache = tmp_path / "cold-cache", tmp_path / "warm-cache"
    # A run without warming and the warm-only run side by side (XLA compiles a program on one thread).
    cold_run = _start_sdg(common + ["--out", str(tmp_path / "cold")], cold_cache)
    warm_run = _start_sdg(common + ["--out", str(tmp_path / "warm"), "--warm-only"], warm_cache)
    (cold, _), (warm, said) = _finish(cold_run), _finish(warm_run)
    assert cold["misses"] == cold["requests"] > 0 and cold["hits"] == 0
    cold_programs = _programs(cold_cache)

    assert not (tmp_path / "warm").exists() and not (tmp_path / "warm.sdg-work").exists()
    # The same programs (keys differ across folders: JAX puts the folder's path into the compile options it hashes).
    assert _programs(warm_cache) == cold_programs
    entries = sorted(os.listdir(warm_cache))
    assert warm["misses"] == warm["requests"] == cold["requests"]
    lines = [line for line in said.splitlines() if line.startswith("compiled ")]
    programs = {"jit_run", "jit__encode_first", "jit__encode_rest", "jit__decode_first", "jit__decode_rest",
                "jit__generate_jit"}
    assert programs <= set(cold_programs)
    # One denoising loop (the policy and its inverse-dynamics read-back share it), the VAE's four, the critic's.
    assert len(lines) == len(programs)
    assert sum("denoising loop (policy" in line for line in lines) == 1
    assert sum("reasoner answer" in line for line in lines) == 1
    assert f"warmed 1 batches: {len(programs)} programs ({len(programs)} new, 0 already cached)" in said

    run, _ = _finish(_start_sdg(common + ["--out", str(tmp_path / "run")], warm_cache))
    assert run["requests"] == cold["requests"] and run["hits"] == run["requests"] and run["misses"] == 0
    assert sorted(os.listdir(warm_cache)) == entries
    assert_same_dataset(tmp_path / "cold", tmp_path / "run", exact=True)

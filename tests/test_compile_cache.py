"""The persistent compilation cache: where it lives, how it is switched off, and that a second process with the
same shapes compiles nothing (every program it needs is a cache hit, and the cache folder does not grow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosmos_jax import compile_cache

# One tiny-preset joint forward (blocked attention, as on CPU), counting JAX's compilation-cache events.
_SCRIPT = """
import json, collections
import jax, jax.numpy as jnp, numpy as np
from jax import monitoring
from cosmos_jax import compile_cache
from cosmos_jax.config import load_preset
from cosmos_jax.modeling.inputs import GeneratorInputs
from cosmos_jax.modeling.transformer import Cosmos3Transformer
from cosmos_jax.packing import batch_generator_positions, batch_text, layout_sequence

events = collections.Counter()
monitoring.register_event_listener(lambda name, **kw: events.update([name]))
folder = compile_cache.enable()
cfg = load_preset("tiny")
model = Cosmos3Transformer(cfg, dtype=jnp.float32, attention="blocked")
params = jax.jit(model.init)(jax.random.key(0))
layout = layout_sequence(cfg, 5, (2, 4, 4), fps=24.0, clean_vision_frames=[0])
text = jax.tree.map(jnp.asarray, batch_text([np.arange(5)], [layout]))
gen = GeneratorInputs(position_ids=jnp.asarray(batch_generator_positions([layout])),
                      vision=jnp.ones((1, cfg.latent_channel, 2, 4, 4), jnp.float32),
                      vision_noisy=jnp.asarray(layout.vision_noisy)[None], vision_t=jnp.full((1,), 800.0))
out = jax.jit(model.__call__)(params, text, gen).vision
print(json.dumps({"folder": folder, "checksum": float(jnp.sum(out)),
                  "requests": events["/jax/compilation_cache/compile_requests_use_cache"],
                  "hits": events["/jax/compilation_cache/cache_hits"],
                  "misses": events["/jax/compilation_cache/cache_misses"]}))
"""


def _run(cache: str) -> dict:
    env = {**os.environ, compile_cache.ENV: cache, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_with_the_same_shapes_compiles_nothing(tmp_path):
    cache = str(tmp_path / "jax-cache")
    first = _run(cache)
    entries = sorted(os.listdir(cache))
    second = _run(cache)
    assert first["folder"] == second["folder"] == cache
    assert first["requests"] > 0 and first["misses"] == first["requests"] and first["hits"] == 0
    assert second["requests"] == first["requests"] and second["hits"] == second["requests"]
    assert second["misses"] == 0
    assert sorted(os.listdir(cache)) == entries
    assert second["checksum"] == first["checksum"]


@pytest.mark.parametrize("setting", ["off", "OFF", "0", "false", "no"])
def test_cache_dir_switch(monkeypatch, setting):
    monkeypatch.setenv(compile_cache.ENV, setting)
    assert compile_cache.cache_dir() is None
    assert compile_cache.enable() is None


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == str(tmp_path / "xdg" / "cosmos-jax" / "jax-cache")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_dir() == str(tmp_path / "mine")


def test_uncreatable_cache_folder_names_the_switch(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "cache"))
    with pytest.raises(OSError, match=f"{compile_cache.ENV}=off"):
        compile_cache.enable()

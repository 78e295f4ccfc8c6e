"""The persistent JAX compilation cache: a second run with the same shapes loads its executables, not compiles.

    enable()        -> the cache folder in use, or None when switched off

The folder is `$COSMOS_JAX_COMPILE_CACHE` if that names a folder, else `$XDG_CACHE_HOME/cosmos-jax/jax-cache`
(`~/.cache/cosmos-jax/jax-cache`). `COSMOS_JAX_COMPILE_CACHE=off` (or 0, false, no) switches it off. Every
compile is cached, however short, because the tiny configs compile in well under JAX's default one-second floor.
Entries are keyed by JAX on the program, the jax/jaxlib versions, the backend, the devices and the compile
options, so a stale entry is never used. The compile options hold the folder's own path (JAX points XLA's
autotune cache into it), so a folder copied or moved elsewhere is not hit. Programs with host callbacks (the
step progress bar of the sampling loop) are never written. `cosmos_jax.aot` fills the cache ahead of time.
"""

from __future__ import annotations

import os

import jax

ENV = "COSMOS_JAX_COMPILE_CACHE"
_OFF = ("off", "0", "false", "no")


def cache_dir() -> str | None:
    """The folder the cache uses under the current environment, or None when switched off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if setting:
        return os.path.abspath(os.path.expanduser(setting))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cosmos-jax", "jax-cache")


def enable() -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir()` (created if needed); call before compiling."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the compile cache folder {folder} (set {ENV}=off to run without it): {e}") from e
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder

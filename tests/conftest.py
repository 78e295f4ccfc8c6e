"""Test session setup: 8 fake CPU devices for mesh tests; deterministic hypothesis profile."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COSMOS_JAX_COMPILE_CACHE", "off")  # tests that want the cache point it at a tmp folder

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("ci")

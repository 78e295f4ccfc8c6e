"""cosmos-jax: NVIDIA Cosmos 3 in JAX/Flax."""

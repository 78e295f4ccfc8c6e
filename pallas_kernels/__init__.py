"""Pallas kernels for Cosmos 3 (joint MoT attention)."""

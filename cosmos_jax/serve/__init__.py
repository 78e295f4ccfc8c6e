"""`cosmos-jax serve`: an ASGI app with the openpi WebSocket policy endpoint and an OpenAI-style /v1/videos jobs
API, in front of a dynamic batcher that gathers concurrent same-shape requests into one batched jitted call."""

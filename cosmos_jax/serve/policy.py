"""The openpi WebSocket policy endpoint (`/` as openpi's server, and `/v1/realtime/robot/openpi`).

On connect the server sends one msgpack-numpy metadata frame. Each binary message is an observation
(`cosmos_jax.serve.fields.policy_request`); the reply is {"actions": float32 [chunk, raw width], "mode",
"seed", "server_timing": {"infer_ms", "compile_s", "batch_size", "compiled_new_shape"}} plus "video" uint8
[F, H, W, 3] when asked for (and always in forward dynamics). A refused request gets a text frame (what
openpi-client raises as an error) holding the JSON error with its status and field, and the connection stays
open; an unexpected failure sends its traceback as text and closes with 1011, as openpi's server does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback

import anyio
import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from cosmos_jax.sampling import media
from cosmos_jax.serve import codec
from cosmos_jax.serve.errors import ServeError, bad_field
from cosmos_jax.serve.fields import policy_request
from cosmos_jax.serve.state import ServeState

log = logging.getLogger("cosmos_jax.serve")


async def policy_endpoint(websocket: WebSocket) -> None:
    state: ServeState = websocket.app.state.serve
    await websocket.accept()
    await websocket.send_bytes(codec.packb(state.engine.metadata(state.batcher.max_batch,
                                                                  state.limits.max_image_side)))
    while True:
        try:
            message = await websocket.receive()
        except WebSocketDisconnect:
            return
        if message["type"] == "websocket.disconnect":
            return
        state.enter()
        try:
            reply = await _answer(state, message)
            await websocket.send_bytes(reply)
            state.metrics.requests.labels("policy").inc()
        except ServeError as e:
            state.metrics.errors.labels("policy", str(e.status)).inc()
            await websocket.send_text(json.dumps(e.to_json()))
        except WebSocketDisconnect:
            return
        except Exception:  # noqa: BLE001 - reported to the client as openpi's server does, then closed
            state.metrics.errors.labels("policy", "500").inc()
            log.exception("policy request failed")
            await websocket.send_text(traceback.format_exc())
            await websocket.close(code=1011, reason="Internal server error. Traceback included in previous frame.")
            return
        finally:
            state.leave()


async def _answer(state: ServeState, message: dict) -> bytes:
    start = time.perf_counter()
    data = message.get("bytes")
    if data is None:
        raise bad_field("message", "expected a binary msgpack-numpy observation, got a text frame")
    state.limits.body(len(data))
    try:
        observation = codec.unpackb(data)
    except codec.CodecError as e:
        raise bad_field("message", str(e)) from None
    parsed = policy_request(observation, state.defaults, state.limits)
    prepared = await anyio.to_thread.run_sync(state.engine.prepare, parsed.request)
    started: dict = {}

    def on_start(compiling: bool, batch_size: int) -> None:
        started.update(compiling=compiling, batch_size=batch_size)
        if compiling:
            log.warning("compiling a new shape (%s, batch of %d): the first request of a shape waits for the "
                        "compile", prepared.shape.describe(), batch_size)

    result = await asyncio.wrap_future(state.batcher.submit(prepared, on_start))
    elapsed = time.perf_counter() - start
    state.metrics.latency.labels("policy").observe(elapsed)
    reply = {"mode": result.mode, "seed": result.seed, "server_timing": {
        "infer_ms": 1000.0 * elapsed, "compile_s": float(result.timings.get("compile", 0.0)),
        "batch_size": started.get("batch_size", 1), "compiled_new_shape": started.get("compiling", False)}}
    if result.actions is not None:
        reply["actions"] = np.asarray(result.actions, np.float32)
    if parsed.return_video:
        reply["video"] = media.to_uint8(result.video)
    return codec.packb(reply)

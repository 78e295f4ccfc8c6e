"""The ASGI app (starlette): routes, the API-key guard, /healthz and /metrics."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from cosmos_jax.serve import videos
from cosmos_jax.serve.auth import APIKeyMiddleware
from cosmos_jax.serve.policy import policy_endpoint
from cosmos_jax.serve.state import ServeState

POLICY_PATHS = ("/", "/v1/realtime/robot/openpi")


async def healthz(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    return JSONResponse({
        "status": "ok" if state.batcher.accepting else "draining",
        "model": state.engine.model_name,
        "model_options": state.engine.model_options,
        "queue_depth": state.batcher.queue_depth,
        "queue_capacity": state.batcher.capacity,
        "max_batch": state.batcher.max_batch,
        "batch_sizes": {str(k): v for k, v in sorted(state.batcher.batch_sizes.items())},
    })


async def metrics(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")


def build_app(state: ServeState) -> Starlette:
    routes = [WebSocketRoute(path, policy_endpoint) for path in POLICY_PATHS] + [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/v1/videos", videos.create_video, methods=["POST"]),
        Route("/v1/videos/sync", videos.create_video_sync, methods=["POST"]),
        Route("/v1/videos/{job_id}", videos.get_video, methods=["GET"]),
        Route("/v1/videos/{job_id}", videos.delete_video, methods=["DELETE"]),
        Route("/v1/videos/{job_id}/content", videos.get_video_content, methods=["GET"]),
    ]
    middleware = [Middleware(APIKeyMiddleware, api_key=state.api_key)] if state.api_key else []
    app = Starlette(routes=routes, middleware=middleware)
    app.state.serve = state
    return app

"""The API key: with `--api-key`, every HTTP request and WebSocket handshake without it is refused with 401.

Accepted as `Authorization: Api-Key KEY` (what openpi-client's WebsocketClientPolicy sends),
`Authorization: Bearer KEY` (OpenAI-style clients) or `X-API-Key: KEY`; compared in constant time.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

_SCHEMES = ("api-key ", "bearer ")


def presented_key(headers: Headers) -> str | None:
    value = headers.get("authorization", "")
    for scheme in _SCHEMES:
        if value.lower().startswith(scheme):
            return value[len(scheme):].strip()
    return headers.get("x-api-key")


def key_matches(presented: str | None, api_key: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), api_key.encode())


class APIKeyMiddleware:
    """Refuse every request without the key: HTTP 401 with a JSON error, a WebSocket handshake 401 (the
    denial-response extension; a close before accepting where the server lacks it)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or key_matches(presented_key(Headers(scope=scope)),
                                                                     self.api_key):
            await self.app(scope, receive, send)
            return
        body = {"error": {"message": "missing or wrong API key (send 'Authorization: Api-Key KEY')",
                          "status": 401, "field": "authorization"}}
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Api-Key"})
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        websocket = WebSocket(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await websocket.send_denial_response(response)
        else:
            await websocket.close(code=1008, reason="missing or wrong API key")

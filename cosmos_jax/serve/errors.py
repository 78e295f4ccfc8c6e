"""The errors a request can meet before or instead of reaching the model, each with its HTTP status."""

from __future__ import annotations


class ServeError(Exception):
    """A refused request: `status` (HTTP code), `field` (the request field at fault, or None) and a one-line
    message. `retry_after` (seconds) is set when trying again later can succeed."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.retry_after = status, field, message, retry_after

    def to_json(self) -> dict:
        body = {"error": {"message": self.message, "status": self.status}}
        if self.field is not None:
            body["error"]["field"] = self.field
        if self.retry_after is not None:
            body["error"]["retry_after"] = self.retry_after
        return body


def bad_field(field: str, message: str) -> ServeError:
    """422: the field's value is not acceptable (the message says why)."""
    return ServeError(422, f"{field}: {message}", field)


def too_large(field: str, message: str) -> ServeError:
    """413: the field (an upload, the body, an image) is over its limit."""
    return ServeError(413, f"{field}: {message}", field)


def queue_full(retry_after: int) -> ServeError:
    return ServeError(429, f"the queue is full; retry after {retry_after} s", retry_after=retry_after)


def draining() -> ServeError:
    return ServeError(503, "the server is shutting down and takes no new requests", retry_after=30)

"""The OpenAI-style video jobs API.

    POST   /v1/videos               JSON or multipart fields (uploads: image / input_reference, video, actions)
                                    -> the job, status "queued", at once
    GET    /v1/videos/{id}          status ("queued", "in_progress", "completed", "failed"), progress 0-100,
                                    "compiling" while a new shape compiles, the batch size, the error if any
    GET    /v1/videos/{id}/content  ?variant=video (mp4; png for one frame), audio, actions (JSON), actions_npy,
                                    latents (the final latents as .npy)
    DELETE /v1/videos/{id}          removes a finished job and its files
    POST   /v1/videos/sync          the same fields; waits and returns the content (?variant=..., default video)

A bad request gets a 4xx JSON error naming the field before anything is queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import anyio
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from cosmos_jax.serve.errors import ServeError, bad_field
from cosmos_jax.serve.fields import ParsedRequest, video_job_request
from cosmos_jax.serve.jobs import CONTENT, COMPLETED, FAILED, valid_job_id
from cosmos_jax.serve.state import ServeState

log = logging.getLogger("cosmos_jax.serve")


def error_response(error: ServeError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers)


async def _fields(request: Request, state: ServeState) -> ParsedRequest:
    """The checked request of a POST body (JSON or multipart), its size bounded before it is read."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ServeError(411, "body: a Content-Length header is required", "body")
    state.limits.body(int(length))
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            form = await request.json()
        except ValueError:
            raise bad_field("body", "not valid JSON") from None
        if not isinstance(form, dict):
            raise bad_field("body", "expected a JSON object of fields")
        return await anyio.to_thread.run_sync(video_job_request, form, state.limits, False)
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form: dict[str, Any] = {}
        async with request.form(max_files=4, max_fields=64) as data:
            for name, value in data.multi_items():
                if name in form:
                    raise bad_field(name, "given more than once")
                if isinstance(value, UploadFile):
                    if value.size is not None:
                        state.limits.upload(name, value.size)
                    value = await value.read(state.limits.max_upload_bytes + 1)
                    state.limits.upload(name, len(value))
                form[name] = value
        return await anyio.to_thread.run_sync(video_job_request, form, state.limits, True)
    raise ServeError(415, f"body: expected application/json or multipart/form-data, got {kind or 'none'}", "body")


def _summary(parsed: ParsedRequest) -> dict[str, Any]:
    """The JSON-able fields of a request, for the job record."""
    r = parsed.request
    summary = {name: getattr(r, name) for name in (
        "prompt", "negative_prompt", "action_mode", "domain", "chunk", "resolution_tier", "num_frames", "height",
        "width", "fps", "steps", "guidance", "seed", "enable_sound")}
    summary["uploads"] = [name for name in ("image", "video", "actions") if getattr(r, name) is not None]
    return summary


async def _submit(request: Request) -> tuple[ServeState, dict[str, Any], asyncio.Future]:
    """Check, prepare and queue one job; the job's record (persisted) and a future that resolves when its outputs
    are written (or its failure recorded)."""
    state: ServeState = request.app.state.serve
    parsed = await _fields(request, state)
    prepared = await anyio.to_thread.run_sync(state.engine.prepare, parsed.request)
    if not state.batcher.accepting:
        raise ServeError(503, "the server is shutting down and takes no new requests", retry_after=30)
    record = state.store.create(_summary(parsed))
    job_id = record["id"]
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    start = time.perf_counter()

    def on_start(compiling: bool, batch_size: int) -> None:
        state.store.start(job_id, compiling, batch_size)
        if compiling:
            log.warning("job %s: compiling a new shape (%s, batch of %d)", job_id, prepared.shape.describe(),
                        batch_size)

    def finish(future) -> None:
        try:
            state.store.complete(job_id, future.result(), parsed.request.domain)
            state.metrics.requests.labels("videos").inc()
        except Exception as e:  # noqa: BLE001 - the job's failure is its record's error
            log.exception("job %s failed", job_id)
            state.store.fail(job_id, f"{type(e).__name__}: {e}")
            state.metrics.errors.labels("videos", "500").inc()
        state.metrics.latency.labels("videos").observe(time.perf_counter() - start)
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
        state.leave()

    state.enter()
    try:
        future = state.batcher.submit(prepared, on_start, lambda f: state.store.progress(job_id, f))
    except ServeError:
        state.leave()
        state.store.delete(job_id)
        raise
    future.add_done_callback(lambda f: state.writer.submit(finish, f))
    return state, state.store.get(job_id), done


async def create_video(request: Request) -> Response:
    try:
        _, record, _ = await _submit(request)
    except ServeError as e:
        request.app.state.serve.metrics.errors.labels("videos", str(e.status)).inc()
        return error_response(e)
    return JSONResponse(record)


async def create_video_sync(request: Request) -> Response:
    variant = request.query_params.get("variant", "video")
    try:
        if variant not in CONTENT:
            raise bad_field("variant", f"expected one of {sorted(CONTENT)}")
        state, record, done = await _submit(request)
    except ServeError as e:
        request.app.state.serve.metrics.errors.labels("videos", str(e.status)).inc()
        return error_response(e)
    await done
    return _content(state, record["id"], variant)


def _job(request: Request) -> tuple[ServeState, str]:
    job_id = request.path_params["job_id"]
    if not valid_job_id(job_id):
        raise ServeError(404, f"id: no job {job_id!r}", "id")
    return request.app.state.serve, job_id


async def get_video(request: Request) -> Response:
    try:
        state, job_id = _job(request)
        record = state.store.get(job_id)
        if record is None:
            raise ServeError(404, f"id: no job {job_id!r}", "id")
    except ServeError as e:
        return error_response(e)
    return JSONResponse(record)


def _content(state: ServeState, job_id: str, variant: str) -> Response:
    record = state.store.get(job_id)
    if record is None:
        return error_response(ServeError(404, f"id: no job {job_id!r}", "id"))
    if record["status"] == FAILED:
        return error_response(ServeError(409, f"id: job {job_id} failed: {record['error']['message']}", "id"))
    if record["status"] != COMPLETED:
        return error_response(ServeError(409, f"id: job {job_id} is {record['status']}; poll GET "
                                              f"/v1/videos/{job_id} until it is completed", "id"))
    found = state.store.content(job_id, variant)
    if found is None:
        return error_response(ServeError(404, f"variant: job {job_id} has no {variant!r} output; it has "
                                              f"{record['content']}", "variant"))
    path, media_type = found
    return FileResponse(path, media_type=media_type, headers={"X-Job-Id": job_id})


async def get_video_content(request: Request) -> Response:
    try:
        state, job_id = _job(request)
        variant = request.query_params.get("variant", "video")
        if variant not in CONTENT:
            raise bad_field("variant", f"expected one of {sorted(CONTENT)}")
    except ServeError as e:
        return error_response(e)
    return _content(state, job_id, variant)


async def delete_video(request: Request) -> Response:
    try:
        state, job_id = _job(request)
        record = state.store.get(job_id)
        if record is None:
            raise ServeError(404, f"id: no job {job_id!r}", "id")
        if record["status"] not in (COMPLETED, FAILED):
            raise ServeError(409, f"id: job {job_id} is {record['status']}; delete it once it has finished", "id")
        state.store.delete(job_id)
    except ServeError as e:
        return error_response(e)
    return JSONResponse({"id": job_id, "object": "video.deleted", "deleted": True})

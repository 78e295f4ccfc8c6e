"""cosmos_jax.serve without a model: the msgpack-numpy codec against openpi-client's, field checks and limits,
the dynamic batcher (gathering, bounded queue, drain), the API key, the job store across a restart."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
from serve_helpers import openpi_client
from starlette.testclient import TestClient

from cosmos_jax.sampling.generate import GenerationResult
from cosmos_jax.serve import codec
from cosmos_jax.serve.app import build_app
from cosmos_jax.serve.batcher import Batcher
from cosmos_jax.serve.errors import ServeError
from cosmos_jax.serve.fields import PolicyDefaults, policy_request, video_job_request
from cosmos_jax.serve.jobs import COMPLETED, FAILED, JobStore
from cosmos_jax.serve.limits import Limits
from cosmos_jax.serve.metrics import Metrics
from cosmos_jax.serve.state import ServeState

DEFAULTS = PolicyDefaults(domain="bridge_orig_lerobot", chunk=4, steps=2, resolution_tier=256)
IMAGE = np.zeros((32, 40, 3), np.uint8)


def test_codec_matches_openpi_client_both_ways():
    openpi_client()
    from openpi_client import msgpack_numpy

    message = {"prompt": "pick", "observation/image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
               "state": np.linspace(0, 1, 7, dtype=np.float32), "nested": {"x": np.float64(2.5), "ids": [1, 2]}}
    for decoded in (codec.unpackb(msgpack_numpy.packb(message)), msgpack_numpy.unpackb(codec.packb(message))):
        np.testing.assert_array_equal(decoded["observation/image"], message["observation/image"])
        assert decoded["observation/image"].dtype == np.uint8
        np.testing.assert_array_equal(decoded["state"], message["state"])
        assert decoded["nested"]["x"] == 2.5 and decoded["nested"]["ids"] == [1, 2]
    assert codec.packb(message) == msgpack_numpy.packb(message)


def test_codec_refuses_objects_and_inconsistent_arrays():
    with pytest.raises(codec.CodecError, match="unsupported dtype"):
        codec.packb({"a": np.array([object()])})
    bad = codec.packb({"a": np.zeros(4, np.float32)}).replace(b"<f4", b"|O8")
    with pytest.raises(codec.CodecError, match="unsupported dtype"):
        codec.unpackb(bad)
    short = codec.packb({"a": np.zeros((2, 2), np.float32)}).replace(b"\x92\x02\x02", b"\x92\x02\x03")
    with pytest.raises(codec.CodecError, match="does not match"):
        codec.unpackb(short)
    with pytest.raises(codec.CodecError, match="not a msgpack"):
        codec.unpackb(b"\xc1")


@pytest.mark.parametrize("obs, field, status", [
    ({"observation/image": IMAGE}, "prompt", 422),
    ({"observation/image": IMAGE, "prompt": "p", "stepz": 3}, "stepz", 422),
    ({"observation/image": IMAGE, "prompt": "p", "steps": 51}, "steps", 422),
    ({"observation/image": IMAGE, "prompt": "p", "chunk": 6}, "chunk", 422),
    ({"observation/image": IMAGE, "prompt": "p", "domain": "mars"}, "domain", 422),
    ({"observation/image": np.zeros((8, 2000, 3), np.uint8), "prompt": "p"}, "observation/image", 413),
    ({"observation/image": IMAGE.astype(np.float32), "prompt": "p"}, "observation/image", 422),
    ({"prompt": "p"}, "image", 422),
    ({"observation/image": IMAGE, "prompt": "p", "observation/state": np.array([np.nan])}, "observation/state", 422),
    ({"observation/image": IMAGE, "prompt": "p", "camera": "wrist"}, "camera", 422),
    ({"observation/image": IMAGE, "prompt": "p", "actions": np.zeros((4, 7), np.float32)}, "actions", 422),
])
def test_policy_request_refusals_name_the_field(obs, field, status):
    with pytest.raises(ServeError) as e:
        policy_request(obs, DEFAULTS, Limits())
    assert (e.value.field, e.value.status) == (field, status), e.value.message
    assert e.value.message.startswith(f"{field}") or field == "request"


def test_policy_request_modes_and_defaults():
    wrist = np.full((16, 16, 3), 7, np.uint8)
    parsed = policy_request({"observation/image": IMAGE, "observation/wrist_image": wrist, "camera":
                             "observation/wrist_image", "prompt": "p", "seed": np.int64(3)}, DEFAULTS, Limits())
    r = parsed.request
    assert (r.action_mode, r.domain, r.chunk, r.steps, r.seed, r.guidance, r.output_type) == (
        "policy", "bridge_orig_lerobot", 4, 2, 3, 1.0, "latent")
    assert r.image is wrist and parsed.return_video is False
    forward = policy_request({"images": {"cam": IMAGE}, "prompt": "p", "actions": np.zeros((4, 10))}, DEFAULTS,
                             Limits())
    assert forward.request.action_mode == "forward_dynamics" and forward.return_video
    inverse = policy_request({"video": np.zeros((5, 16, 16, 3), np.uint8), "prompt": "p"}, DEFAULTS, Limits())
    assert inverse.request.action_mode == "inverse_dynamics" and len(inverse.request.video) == 5


def test_video_job_fields_text_and_json():
    parsed = video_job_request({"prompt": "a", "num_frames": "5", "size": "64x32", "steps": "3", "sound": "false",
                                "guidance": "2.5"}, Limits(), from_text=True)
    r = parsed.request
    assert (r.num_frames, r.height, r.width, r.steps, r.guidance, r.enable_sound) == (5, 32, 64, 3, 2.5, False)
    with pytest.raises(ServeError, match="num_frames") as e:
        video_job_request({"prompt": "a", "num_frames": 6}, Limits(), from_text=False)
    assert e.value.field == "num_frames"
    with pytest.raises(ServeError) as e:
        video_job_request({"prompt": "a", "steps": "many"}, Limits(), from_text=True)
    assert (e.value.field, e.value.status) == ("steps", 422)
    with pytest.raises(ServeError) as e:
        video_job_request({"prompt": "a", "image": b"x" * 2048}, Limits(max_upload_bytes=1024), from_text=True)
    assert (e.value.field, e.value.status) == ("image", 413)


# --------------------------------------------------------------------------- a server with a model stand-in


@dataclasses.dataclass(frozen=True)
class _Shape:
    steps: int

    def describe(self) -> str:
        return f"{self.steps} steps"


@dataclasses.dataclass(frozen=True, eq=False)
class _Item:
    request: object
    shape: _Shape


class FakeEngine:
    """Plans nothing; `run` waits for `release` and answers actions = seed (so replies can be told apart)."""

    model_name = "fake"
    model_options = {"quantize": "int8", "lora": [], "merge_lora": False, "offload_reasoner": False}
    defaults = DEFAULTS

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[int] = []

    def prepare(self, request):
        return _Item(request, _Shape(request.steps))

    def is_compiled(self, items):
        return True

    def run(self, items, progress=None):
        assert self.release.wait(30)
        self.batches.append(len(items))
        return [GenerationResult(mode="policy", fps=24.0, latents=np.zeros(1, np.float32), seed=i.request.seed,
                                 actions=np.full((4, 10), i.request.seed, np.float32),
                                 video=np.zeros((5, 16, 16, 3), np.float32)) for i in items]

    def metadata(self, max_batch, max_image_side):
        return {"model": self.model_name, "max_batch": max_batch}


def _state(tmp_path, engine, *, queue=2, max_batch=2, max_wait_ms=50.0, api_key=None):
    metrics = Metrics(max_batch)
    batcher = Batcher(engine, metrics, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, capacity=queue)
    return ServeState(engine, batcher, JobStore(tmp_path / "results"), Limits(max_upload_bytes=4096), metrics,
                      DEFAULTS, api_key)


def _obs(seed):
    return codec.packb({"observation/image": IMAGE, "prompt": "p", "seed": seed})


def test_batcher_gathers_same_shape_and_bounds_the_queue(tmp_path):
    engine = FakeEngine()
    state = _state(tmp_path, engine, queue=2, max_batch=2, max_wait_ms=2000)
    items = [engine.prepare(policy_request({"observation/image": IMAGE, "prompt": "p", "seed": s, "steps": st},
                                           DEFAULTS, Limits()).request) for s, st in ((0, 2), (1, 3), (2, 2))]
    futures = [state.batcher.submit(items[0])]
    time.sleep(0.2)  # the worker holds item 0 and waits for company of its shape
    futures += [state.batcher.submit(items[1]), state.batcher.submit(items[2])]
    with pytest.raises(ServeError) as e:
        state.batcher.submit(items[1])
    assert e.value.status == 429 and e.value.retry_after >= 1
    engine.release.set()
    assert [f.result(10).seed for f in futures] == [0, 1, 2]
    assert engine.batches == [2, 1]  # items 0 and 2 (2 steps) together, item 1 (3 steps) alone
    state.close()


def test_websocket_and_http_errors_queue_full_and_key(tmp_path):
    engine = FakeEngine()
    state = _state(tmp_path, engine, queue=1, max_batch=1, max_wait_ms=0, api_key="secret")
    client = TestClient(build_app(state))
    assert client.get("/healthz").status_code == 401
    assert client.get("/healthz", headers={"Authorization": "Api-Key wrong"}).status_code == 401
    key = {"Authorization": "Api-Key secret"}
    health = client.get("/healthz", headers=key).json()
    assert (health["status"], health["model_options"]["quantize"]) == ("ok", "int8")
    with client.websocket_connect("/", headers=key) as a, client.websocket_connect("/", headers=key) as b, \
            client.websocket_connect("/v1/realtime/robot/openpi", headers=key) as c:
        assert codec.unpackb(a.receive_bytes())["model"] == "fake"
        b.receive_bytes(), c.receive_bytes()
        a.send_bytes(_obs(0))
        time.sleep(0.3)  # running
        b.send_bytes(_obs(1))
        time.sleep(0.3)  # queued: the queue of 1 is full
        c.send_bytes(_obs(2))
        error = json.loads(c.receive_text())["error"]
        assert error["status"] == 429 and error["retry_after"] >= 1
        job = client.post("/v1/videos", json={"prompt": "a", "num_frames": 5, "height": 32, "width": 32}, headers=key)
        assert job.status_code == 429 and int(job.headers["Retry-After"]) >= 1
        c.send_bytes(codec.packb({"observation/image": IMAGE, "prompt": "p", "stepz": 1}))
        assert json.loads(c.receive_text())["error"]["field"] == "stepz"
        c.send_text("hello")
        assert json.loads(c.receive_text())["error"]["field"] == "message"
        engine.release.set()
        assert codec.unpackb(a.receive_bytes())["actions"][0, 0] == 0
        reply = codec.unpackb(b.receive_bytes())
        assert reply["actions"].shape == (4, 10) and reply["actions"][0, 0] == 1
        assert reply["server_timing"]["batch_size"] == 1
    bad = client.post("/v1/videos", json={"prompt": "a", "steps": 0}, headers=key)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "steps"
    big = client.post("/v1/videos", data={"prompt": "a"}, files={"image": ("a.png", b"\0" * 5000)}, headers=key)
    assert big.status_code == 413 and big.json()["error"]["field"] == "image"
    metrics = client.get("/metrics", headers=key).text
    assert 'cosmos_serve_errors_total{endpoint="policy",status="429"} 1.0' in metrics
    state.close()


def test_drain_finishes_accepted_requests_and_refuses_new(tmp_path):
    engine = FakeEngine()
    state = _state(tmp_path, engine, queue=4, max_batch=1, max_wait_ms=0)
    item = engine.prepare(policy_request({"observation/image": IMAGE, "prompt": "p"}, DEFAULTS, Limits()).request)
    futures = [state.batcher.submit(item), state.batcher.submit(item)]
    drained = threading.Thread(target=state.drain)
    drained.start()
    time.sleep(0.2)
    with pytest.raises(ServeError) as e:
        state.batcher.submit(item)
    assert e.value.status == 503
    assert drained.is_alive()  # waiting for the two accepted requests
    engine.release.set()
    drained.join(10)
    assert not drained.is_alive() and all(f.done() and f.exception() is None for f in futures)
    state.close()


def test_job_store_marks_unfinished_jobs_failed_after_a_restart(tmp_path):
    store = JobStore(tmp_path)
    done, running, queued = (store.create({"prompt": str(i)})["id"] for i in range(3))
    store.start(running, compiling=True, batch_size=1)
    store.start(done, compiling=False, batch_size=2)
    result = GenerationResult(mode="text2video", fps=24.0, latents=np.zeros(1, np.float32),
                              video=np.random.default_rng(0).random((5, 16, 16, 3), np.float32))
    store.complete(done, result, None)
    mp4 = (tmp_path / done / "video.mp4").read_bytes()
    again = JobStore(tmp_path)
    assert again.recovered_failed == 2
    assert again.get(done)["status"] == COMPLETED and again.content(done, "video")[0].read_bytes() == mp4
    assert again.get(done)["content"] == ["video", "latents"] and again.get(done)["batch_size"] == 2
    for job in (running, queued):
        record = again.get(job)
        assert record["status"] == FAILED and "server stopped" in record["error"]["message"]
    assert not list(tmp_path.glob("*/.*tmp*"))
    assert again.delete(done) and not (tmp_path / done).exists() and again.get(done) is None


def test_video_job_uploads_image_and_actions():
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.arange(32 * 40 * 3, dtype=np.uint32).reshape(32, 40, 3).astype(np.uint8)).save(png, "PNG")
    actions = io.BytesIO()
    np.save(actions, np.ones((4, 10), np.float32))
    parsed = video_job_request({"prompt": "push", "action_mode": "forward_dynamics", "domain": "bridge_orig_lerobot",
                                "chunk": "4", "input_reference": png.getvalue(), "actions": actions.getvalue()},
                               Limits(), from_text=True)
    r = parsed.request
    assert r.image.shape == (32, 40, 3) and r.image[0, 1, 0] == 3 and r.actions.shape == (4, 10)
    assert r.guidance == 1.0  # action modes default to no guidance, as `generate` does
    as_json = video_job_request({"prompt": "push", "image": base64.b64encode(png.getvalue()).decode(),
                                 "num_frames": 5, "height": 32, "width": 32}, Limits(), from_text=False)
    np.testing.assert_array_equal(as_json.request.image, r.image)
    with pytest.raises(ServeError) as e:
        video_job_request({"prompt": "p", "image": "not base64!"}, Limits(), from_text=False)
    assert e.value.field == "image"
    with pytest.raises(ServeError) as e:
        video_job_request({"prompt": "p", "image": png.getvalue()}, Limits(max_image_side=16), from_text=True)
    assert (e.value.field, e.value.status) == ("image", 413)


@pytest.mark.parametrize("argv, words", [
    (["--model", "/nonexistent/model"], ["--model", "not found"]),
    (["--max-batch", "0"], ["--max-batch"]),
    (["--domain", "mars"], ["--domain", "mars"]),
    (["--max-wait-ms", "nan"], ["--max-wait-ms"]),
    (["--port", "70000"], ["--port"]),
])
def test_serve_command_refuses_bad_flags_in_one_line(argv, words, tmp_path, capsys):
    from cosmos_jax import cli

    model = [] if "--model" in argv else ["--model", str(tmp_path)]
    assert cli.main(["serve", *model, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert all(word in err for word in words), err

"""`cosmos-jax serve` end to end on loopback with the tiny demo checkpoint (fp32, xla attention): openpi-client
gets the chunk `cosmos-jax generate` writes, /v1/videos gives its mp4, concurrent requests batch and still equal
their offline results, a killed server's finished jobs survive and its queued ones are reported failed, SIGTERM
finishes accepted jobs and refuses new ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from serve_helpers import free_port, openpi_client, running_server

from cosmos_jax.demo import build_demo_checkpoint, demo_image
from cosmos_jax.sampling import media
from cosmos_jax.sampling.generate import Cosmos3Pipeline
from cosmos_jax.sampling.request import GenerationRequest
from cosmos_jax.serve.engine import Engine
from cosmos_jax.serve.fields import PolicyDefaults
from cosmos_jax.serve.state import create_state

pytestmark = pytest.mark.slow
KEY = "test-key"
POLICY = dict(domain="bridge_orig_lerobot", chunk=4, steps=2, resolution_tier=256)
VIDEO = {"prompt": "A red cube on a table.", "num_frames": 5, "height": 32, "width": 32, "steps": 2,
         "guidance": 2.0, "seed": 3}
COMMON = ["--dtype", "float32", "--attention", "xla"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("serve") / "checkpoint")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "first_frame.png"
    demo_image(32, 32).save(path)
    return path


def _cli(*args):
    return [sys.executable, "-m", "cosmos_jax.cli", *args]


def _generate(checkpoint, out, *args):
    subprocess.run(_cli("generate", "--model", str(checkpoint), "--output", str(out), "--no-progress", *COMMON,
                        *args), check=True, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    pipeline = Cosmos3Pipeline.from_pretrained(checkpoint, dtype=jnp.float32, attention="xla")
    engine = Engine(pipeline, "tiny-demo", PolicyDefaults(**POLICY))
    state = create_state(engine, results=str(tmp_path_factory.mktemp("results")), max_batch=2,
                         max_wait_ms=500.0, queue=8, api_key=KEY)
    with running_server(state) as address:
        yield address, pipeline


def test_openpi_client_gets_the_chunk_cosmos_jax_generate_writes(server, checkpoint, image, tmp_path):
    address, _ = server
    host, port = address.split(":")
    client = openpi_client().WebsocketClientPolicy(host, int(port), api_key=KEY)
    metadata = client.get_server_metadata()
    assert (metadata["chunk"], metadata["action_dim"], metadata["domain"]) == (4, 10, "bridge_orig_lerobot")
    observation = {"observation/image": np.asarray(Image.open(image).convert("RGB")),
                   "observation/state": np.zeros(7, np.float32), "prompt": "Pick up the dark block.", "seed": 5}
    reply = client.infer(observation)
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (4, 10)
    assert reply["server_timing"]["compiled_new_shape"] is True and reply["server_timing"]["compile_s"] > 0
    again = client.infer(observation)
    assert again["server_timing"]["compiled_new_shape"] is False and again["server_timing"]["compile_s"] == 0
    _generate(checkpoint, tmp_path / "policy.npy", "--prompt", "Pick up the dark block.", "--image", str(image),
              "--action-mode", "policy", "--domain", "bridge_orig_lerobot", "--chunk", "4", "--resolution-tier",
              "256", "--steps", "2", "--seed", "5", "--output-type", "latent")
    offline = np.load(tmp_path / "policy.actions.npy")
    np.testing.assert_allclose(reply["actions"], offline, rtol=0, atol=1e-6)
    np.testing.assert_allclose(again["actions"], offline, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match='"field": "chunk"'):
        client.infer({**observation, "chunk": 5})


def test_wrong_key_is_refused_on_the_websocket_and_http(server):
    address, _ = server
    import websockets

    with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
        openpi_client().WebsocketClientPolicy(f"ws://{address}", api_key="wrong")
    assert httpx.get(f"http://{address}/healthz").status_code == 401
    r = httpx.post(f"http://{address}/v1/videos", json=VIDEO, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"


def _wait(address, job_id, headers, statuses=("completed", "failed"), timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = httpx.get(f"http://{address}/v1/videos/{job_id}", headers=headers).json()
        if record["status"] in statuses:
            return record
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {record}")


def test_video_job_create_poll_download_equals_cosmos_jax_generate(server, checkpoint, tmp_path):
    address, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    created = httpx.post(f"http://{address}/v1/videos", json=VIDEO, headers=headers)
    assert created.status_code == 200 and created.json()["status"] == "queued"
    job_id = created.json()["id"]
    record = _wait(address, job_id, headers)
    assert (record["status"], record["progress"], record["batch_size"]) == ("completed", 100, 1)
    assert record["content"] == ["video", "latents"]
    mp4 = httpx.get(f"http://{address}/v1/videos/{job_id}/content", headers=headers)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    _generate(checkpoint, tmp_path / "offline.mp4", "--prompt", VIDEO["prompt"], "--num-frames", "5", "--height",
              "32", "--width", "32", "--steps", "2", "--guidance", "2", "--seed", "3")
    assert mp4.content == (tmp_path / "offline.mp4").read_bytes()
    missing = httpx.get(f"http://{address}/v1/videos/{job_id}/content?variant=actions", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "variant"
    sync = httpx.post(f"http://{address}/v1/videos/sync", json=VIDEO, headers=headers, timeout=300)
    assert sync.status_code == 200 and sync.content == mp4.content
    bad = httpx.post(f"http://{address}/v1/videos", json={**VIDEO, "height": 33}, headers=headers)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "height"
    deleted = httpx.delete(f"http://{address}/v1/videos/{job_id}", headers=headers)
    assert deleted.json()["deleted"] is True
    assert httpx.get(f"http://{address}/v1/videos/{job_id}", headers=headers).status_code == 404


def test_concurrent_policy_requests_share_a_batch_and_equal_their_offline_results(server, image):
    address, pipeline = server
    module = openpi_client()
    frame = np.asarray(Image.open(image).convert("RGB"))
    clients = [module.WebsocketClientPolicy(f"ws://{address}", api_key=KEY) for _ in range(2)]
    replies: dict[int, dict] = {}

    def ask(i):
        replies[i] = clients[i].infer({"observation/image": frame, "prompt": f"task {i}", "seed": 10 + i})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [replies[i]["server_timing"]["batch_size"] for i in range(2)] == [2, 2]
    for i in range(2):
        offline = pipeline(GenerationRequest(f"task {i}", image=frame, action_mode="policy", output_type="latent",
                                             guidance=1.0, seed=10 + i, **POLICY), progress=False)
        np.testing.assert_allclose(replies[i]["actions"], offline.actions, rtol=0, atol=1e-6)
    metrics = httpx.get(f"http://{address}/metrics", headers={"Authorization": f"Api-Key {KEY}"}).text
    assert 'cosmos_serve_batch_size_bucket{le="1.0"}' in metrics and "cosmos_serve_request_seconds" in metrics


def test_forward_and_inverse_dynamics_take_the_policy_route(server, image):
    address, pipeline = server
    client = openpi_client().WebsocketClientPolicy(f"ws://{address}", api_key=KEY)
    frame = np.asarray(Image.open(image).convert("RGB"))
    actions = np.linspace(-1, 1, 40, dtype=np.float32).reshape(4, 10)
    forward = client.infer({"observation/image": frame, "prompt": "push", "actions": actions, "seed": 2})
    assert forward["mode"] == "forward_dynamics" and forward["video"].dtype == np.uint8
    offline = pipeline(GenerationRequest("push", image=frame, action_mode="forward_dynamics", actions=actions,
                                         guidance=1.0, seed=2, **POLICY), progress=False)
    np.testing.assert_array_equal(forward["video"], media.to_uint8(offline.video))
    clip = forward["video"]
    inverse = client.infer({"video": clip, "prompt": "push", "seed": 4})
    assert inverse["mode"] == "inverse_dynamics" and "video" not in inverse
    offline = pipeline(GenerationRequest("push", video=list(clip), action_mode="inverse_dynamics", guidance=1.0,
                                         seed=4, output_type="latent", **POLICY), progress=False)
    np.testing.assert_allclose(inverse["actions"], offline.actions, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ a server in its own process


def _start(checkpoint, results, port, log):
    process = subprocess.Popen(
        _cli("serve", "--model", str(checkpoint), "--port", str(port), "--results", str(results), "--max-batch",
             "1", "--max-wait-ms", "0", *COMMON), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited while starting"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError("the server did not start")


def test_killed_server_keeps_finished_jobs_and_reports_queued_ones_failed(checkpoint, tmp_path):
    results, port = tmp_path / "results", free_port()
    with open(tmp_path / "server.log", "wb") as log:
        process = _start(checkpoint, results, port, log)
        base = f"http://127.0.0.1:{port}"
        try:
            finished = httpx.post(f"{base}/v1/videos", json=VIDEO).json()["id"]
            assert _wait(f"127.0.0.1:{port}", finished, {})["status"] == "completed"
            mp4 = httpx.get(f"{base}/v1/videos/{finished}/content").content
            # a new shape (3 steps) compiles for seconds: the first of these runs, the others wait
            pending = [httpx.post(f"{base}/v1/videos", json={**VIDEO, "steps": 3, "seed": s}).json()["id"]
                       for s in range(3)]
            running = _wait(f"127.0.0.1:{port}", pending[0], {}, statuses=("in_progress",))
            assert running["compiling"] is True  # the first request of a new shape says so
            assert httpx.get(f"{base}/v1/videos/{pending[2]}").json()["status"] == "queued"
        finally:
            process.kill()
            process.wait()

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        process = _start(checkpoint, results, port, log)
        try:
            assert httpx.get(f"{base}/v1/videos/{finished}").json()["status"] == "completed"
            assert httpx.get(f"{base}/v1/videos/{finished}/content").content == mp4
            for job_id in pending:
                record = httpx.get(f"{base}/v1/videos/{job_id}").json()
                assert record["status"] == "failed" and "server stopped" in record["error"]["message"]
                assert httpx.get(f"{base}/v1/videos/{job_id}/content").status_code == 409

            # SIGTERM: the accepted job (a new 4-step shape, compiling) finishes; a new one is refused
            accepted = httpx.post(f"{base}/v1/videos", json={**VIDEO, "steps": 4}).json()["id"]
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            refused = httpx.post(f"{base}/v1/videos", json=VIDEO)
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            assert process.wait(300) == 0
        finally:
            if process.poll() is None:
                process.kill()
    record = json.loads((results / accepted / "job.json").read_text())
    assert record["status"] == "completed" and os.path.getsize(results / accepted / "video.mp4") > 0


def test_bench_serve_short_run(checkpoint, tmp_path):
    openpi_client()  # the tool needs it installed
    report_path = tmp_path / "bench.json"
    tool = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "bench_serve.py")
    run = subprocess.run([sys.executable, tool, "--model", str(checkpoint), "--clients", "2", "--requests", "2",
                          "--burst", "2", "--max-batch", "2", "--json", str(report_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["all_equal_offline"] and report["replies_differing_from_offline"] == 0
    assert report["policy"]["replies"] == 4 and report["videos"]["jobs"] == 2
    assert report["rss_within_bound"] and report["rss_mb"]["growth"] <= report["rss_mb"]["bound"]
    assert sum(report["policy"]["batch_sizes"].values()) == 4 and report["policy"]["p99_s"] > 0

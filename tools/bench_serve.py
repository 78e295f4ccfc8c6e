"""A bounded load test of `cosmos-jax serve` on 127.0.0.1 with the tiny demo checkpoint.

    python tools/bench_serve.py [--clients 4] [--requests 4] [--burst 4] [--max-batch 4] [--json out.json]

Starts `cosmos-jax serve` (fp32, xla attention) in its own process, then:
  1. warm-up: one round of the same load (every batch size the load produces gets compiled);
  2. policy load: N openpi-client WebsocketClientPolicy clients in threads, M sequential `infer` calls each;
  3. a burst of B concurrent POST /v1/videos jobs, polled until done, then downloaded.
Reports throughput (replies per second of each phase's wall time), p50/p99 latency, the batch sizes the server
formed (from each reply's server_timing and from /healthz), whether every reply equalled its offline result
(the same request run alone through `Cosmos3Pipeline` in this process: actions within 1e-6, mp4 bytes equal),
and the server's RSS before and after the measured phases, which must grow by at most --rss-growth-mb.
Exit status 1 when a reply differs or the RSS bound is broken. openpi-client must be installed
(`pip install --no-deps openpi-client==0.1.2`: it pins numpy < 2 but runs on numpy 2).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import httpx
import numpy as np

DOMAIN, CHUNK, TIER = "bridge_orig_lerobot", 4, 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _start_server(model: str, port: int, args: argparse.Namespace, results: str, log: Any) -> subprocess.Popen:
    command = [sys.executable, "-m", "cosmos_jax.cli", "serve", "--model", model, "--port", str(port),
               "--results", results, "--dtype", "float32", "--attention", "xla", "--max-batch", str(args.max_batch),
               "--max-wait-ms", str(args.max_wait_ms), "--queue", str(max(64, args.clients + args.burst)),
               "--domain", DOMAIN, "--chunk", str(CHUNK), "--steps", str(args.steps), "--resolution-tier", str(TIER)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited while starting (see {log.name})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("the server did not start in 600 s")


def _observation(image: np.ndarray, client: int, request: int, rnd: int) -> dict[str, Any]:
    return {"observation/image": image, "prompt": f"Pick up block {client}.",
            "seed": 1000 * rnd + 100 * client + request}


def _policy_load(address: str, image: np.ndarray, clients: int, requests: int, rnd: int) -> dict[str, Any]:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    host, port = address.split(":")
    policies = [WebsocketClientPolicy(host, int(port)) for _ in range(clients)]
    replies: dict[tuple[int, int], dict] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            start = time.perf_counter()
            reply = policies[i].infer(_observation(image, i, j, rnd))
            with lock:
                latencies.append(time.perf_counter() - start)
                replies[(i, j)] = reply

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return {"replies": replies, "latencies": latencies, "wall": wall}


def _video_fields(k: int, rnd: int, steps: int) -> dict[str, Any]:
    return {"prompt": f"A cube number {k} on a table.", "num_frames": 5, "height": 32, "width": 32, "steps": steps,
            "guidance": 2.0, "seed": 1000 * rnd + k}


def _video_burst(address: str, burst: int, rnd: int, steps: int) -> dict[str, Any]:
    base = f"http://{address}"

    def job(k: int) -> dict[str, Any]:
        start = time.perf_counter()
        job_id = httpx.post(f"{base}/v1/videos", json=_video_fields(k, rnd, steps)).json()["id"]
        while True:
            record = httpx.get(f"{base}/v1/videos/{job_id}").json()
            if record["status"] in ("completed", "failed"):
                break
            time.sleep(0.05)
        if record["status"] != "completed":
            raise RuntimeError(f"job {job_id} failed: {record['error']}")
        latency = time.perf_counter() - start
        content = f"{base}/v1/videos/{job_id}/content"
        latents = np.load(io.BytesIO(httpx.get(f"{content}?variant=latents").content), allow_pickle=False)
        return {"latency": latency, "mp4": httpx.get(content).content, "latents": latents,
                "batch_size": record["batch_size"]}

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        jobs = list(pool.map(job, range(burst)))
    return {"jobs": jobs, "latencies": [j["latency"] for j in jobs], "wall": time.perf_counter() - start}


def _offline_checks(model: str, image: np.ndarray, policy: dict, videos: dict, rnd: int, steps: int) -> dict:
    """Every reply against the same request run alone in this process: policy actions and video latents within
    1e-6 / 1e-5 (fp32; a batched call rounds differently in the last bits), mp4 bytes equal where the job ran
    alone (a batched job's frames can differ by one uint8 rounding step, so its mp4 may differ)."""
    import jax.numpy as jnp

    from cosmos_jax.sampling import media
    from cosmos_jax.sampling.generate import Cosmos3Pipeline
    from cosmos_jax.sampling.request import GenerationRequest

    pipeline = Cosmos3Pipeline.from_pretrained(model, dtype=jnp.float32, attention="xla")
    checks = {"actions_differing": 0, "latents_differing": 0, "mp4_identical": 0, "mp4_alone_differing": 0,
              "max_action_error": 0.0, "max_latent_error": 0.0}
    for (i, j), reply in sorted(policy["replies"].items()):
        obs = _observation(image, i, j, rnd)
        offline = pipeline(GenerationRequest(obs["prompt"], image=image, action_mode="policy", domain=DOMAIN,
                                             chunk=CHUNK, resolution_tier=TIER, steps=steps, guidance=1.0,
                                             seed=obs["seed"], output_type="latent"), progress=False)
        error = float(np.max(np.abs(reply["actions"] - offline.actions)))
        checks["max_action_error"] = max(checks["max_action_error"], error)
        checks["actions_differing"] += not error <= 1e-6
    with tempfile.TemporaryDirectory() as folder:
        for k, job in enumerate(videos["jobs"]):
            result = pipeline(GenerationRequest(**_video_fields(k, rnd, steps)), progress=False)
            error = float(np.max(np.abs(job["latents"] - result.latents)))
            checks["max_latent_error"] = max(checks["max_latent_error"], error)
            checks["latents_differing"] += not error <= 1e-5
            path = media.write_video_outputs(os.path.join(folder, f"v{k}"), result.video, result.fps)[0]
            with open(path, "rb") as f:
                same = f.read() == job["mp4"]
            checks["mp4_identical"] += same
            checks["mp4_alone_differing"] += job["batch_size"] == 1 and not same
    return checks


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1024**2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo checkpoint, built once)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent WebSocket clients")
    parser.add_argument("--requests", type=int, default=4, help="sequential requests per client")
    parser.add_argument("--burst", type=int, default=4, help="concurrent /v1/videos jobs")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rss-growth-mb", type=float, default=64.0,
                        help="the most the server's RSS may grow over the measured phases")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    for flag in ("clients", "requests", "burst", "max_batch", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")

    from cosmos_jax.demo import DEFAULT_CACHE, build_demo_checkpoint, demo_image

    model = args.model or str(build_demo_checkpoint(DEFAULT_CACHE / "checkpoint"))
    image = np.asarray(demo_image(32, 32))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as results, open(os.path.join(results, "server.log"), "wb") as log:
        server = _start_server(model, port, args, os.path.join(results, "jobs"), log)
        try:
            _policy_load(address, image, args.clients, args.requests, rnd=0)  # warm-up: compiles
            _video_burst(address, args.burst, rnd=0, steps=args.steps)
            rss_before = _rss_mb(server.pid)
            compiled_before = httpx.get(f"http://{address}/metrics").text
            policy = _policy_load(address, image, args.clients, args.requests, rnd=1)
            videos = _video_burst(address, args.burst, rnd=1, steps=args.steps)
            rss_after = _rss_mb(server.pid)
            health = httpx.get(f"http://{address}/healthz").json()
            metrics = httpx.get(f"http://{address}/metrics").text
        finally:
            server.terminate()
            server.wait(120)
    checks = _offline_checks(model, image, policy, videos, rnd=1, steps=args.steps)
    wrong = checks["actions_differing"] + checks["latents_differing"] + checks["mp4_alone_differing"]
    sizes = [r["server_timing"]["batch_size"] for r in policy["replies"].values()]
    report = {
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs ({platform.machine()})",
        "clients": args.clients, "requests_per_client": args.requests, "burst": args.burst,
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "steps": args.steps,
        "policy": {"replies": len(policy["replies"]), "throughput_per_s": len(policy["replies"]) / policy["wall"],
                   "p50_s": _percentile(policy["latencies"], 50), "p99_s": _percentile(policy["latencies"], 99),
                   "batch_sizes": {str(k): sizes.count(k) for k in sorted(set(sizes))}},
        "videos": {"jobs": len(videos["jobs"]), "throughput_per_s": len(videos["jobs"]) / videos["wall"],
                   "p50_s": _percentile(videos["latencies"], 50), "p99_s": _percentile(videos["latencies"], 99),
                   "batch_sizes": {str(k): [j["batch_size"] for j in videos["jobs"]].count(k)
                                   for k in sorted({j["batch_size"] for j in videos["jobs"]})}},
        "server_batch_sizes": health["batch_sizes"],
        "compiles_during_measurement": _compiles(metrics) - _compiles(compiled_before),
        "offline_checks": checks,
        "replies_differing_from_offline": wrong,
        "all_equal_offline": wrong == 0,
        "rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1),
                   "growth": round(rss_after - rss_before, 1), "bound": args.rss_growth_mb},
        "rss_within_bound": rss_after - rss_before <= args.rss_growth_mb,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0 if report["all_equal_offline"] and report["rss_within_bound"] else 1


def _compiles(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("cosmos_serve_compiles_total"):
            return float(line.split()[-1])
    return 0.0


if __name__ == "__main__":
    sys.exit(main())

"""Overhead: what gemmaq's own machinery costs, against the least that Celery and FastAPI can do.

    .venv/bin/python bench/overhead.py [--clients 32] [--jobs 640]

In one run, on one PostgreSQL and Redis of its own:
- gemmaq `echo` jobs end to end: each of `--clients` clients submits a job and waits for its
  result (`GET ?wait=`), again and again; jobs/s, and the submit latency p50/p99.
- raw Celery: the same clients call a no-op task and wait for its result (`delay().get()`)
  through a threads-pool worker (bench/refs/noop_celery.py); round trips/s.
- submissions alone: the clients only POST; gemmaq's `/v1/jobs` (auth, quota admission, row,
  message) against a minimal FastAPI endpoint that validates, inserts one row and enqueues one
  message (bench/refs/minimal_api.py); requests/s and latency.

The last line: echo jobs/s over Celery's no-op rate, and gemmaq's submit rate over the minimal one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import Cluster  # noqa: E402
from gemmaq.embedded import free_port  # noqa: E402


def drive(clients: int, total: int, call: Callable[[int], float]) -> dict[str, float]:
    """`total` calls spread over `clients` threads; `call` returns its own latency of interest (s)."""
    latencies: list[float] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(call, range(total)))
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "rate": total / seconds,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=640)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gemmaq-overhead-"))
    cluster = Cluster(folder, variants="echo", workers=1, log_level="WARNING")
    helpers: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[str, float]] = {}
    try:
        print("starting the stack and the two references…", flush=True)
        cluster.start()
        env = os.environ | {
            "BENCH_DATABASE_URL": cluster.env["GEMMAQ_DATABASE_URL"],
            "BENCH_REDIS_URL": cluster.redis.url,
            "PYTHONPATH": str(ROOT),
        }
        bin_dir = Path(sys.executable).parent
        helpers.append(
            subprocess.Popen(
                [str(bin_dir / "celery"), "-A", "bench.refs.noop_celery", "worker", "--pool=threads",
                 f"-c{args.clients}", "--without-gossip", "--without-mingle", "--loglevel=WARNING"],
                env=env, cwd=ROOT, stdout=(folder / "noop.log").open("ab"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        port = free_port()
        helpers.append(
            subprocess.Popen(
                [str(bin_dir / "uvicorn"), "bench.refs.minimal_api:app", "--port", str(port), "--log-level",
                 "warning", "--no-access-log"],
                env=env, cwd=ROOT, stdout=(folder / "minimal.log").open("ab"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        minimal = f"http://127.0.0.1:{port}"
        wait_http(f"{minimal}/docs")
        headers = {"Authorization": f"Bearer {cluster.key}"}
        limits = httpx.Limits(max_connections=args.clients)
        with (
            httpx.Client(base_url=cluster.url, headers=headers, timeout=60, limits=limits) as gq,
            httpx.Client(base_url=minimal, timeout=60, limits=limits) as mini,
        ):
            body = {"variant": "echo", "input": {"prompt": "overhead"}, "params": {"max_new_tokens": 16}}

            def echo_job(_: int) -> float:
                started = time.perf_counter()
                job_id = gq.post("/v1/jobs", json=body).json()["id"]
                submitted = time.perf_counter() - started
                while gq.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] != "succeeded":
                    pass
                return submitted

            def submit_only(_: int) -> float:
                started = time.perf_counter()
                assert gq.post("/v1/jobs", json=body).status_code == 202
                return time.perf_counter() - started

            def submit_minimal(_: int) -> float:
                started = time.perf_counter()
                assert (
                    mini.post("/jobs", json={"prompt": "overhead", "max_new_tokens": 16}).status_code == 202
                )
                return time.perf_counter() - started

            os.environ["BENCH_REDIS_URL"] = cluster.redis.url
            from bench.refs.noop_celery import noop

            def celery_round_trip(i: int) -> float:
                started = time.perf_counter()
                assert noop.delay(i).get(timeout=60) == i
                return time.perf_counter() - started

            for name, call in (
                ("raw Celery no-op round trip", celery_round_trip),
                ("gemmaq echo job end to end", echo_job),
                ("minimal endpoint: validate + insert + enqueue", submit_minimal),
                ("gemmaq POST /v1/jobs (submit only)", submit_only),
            ):
                drive(args.clients, args.clients, call)  # warm-up: connections, pools
                results[name] = drive(args.clients, args.jobs, call)
    finally:
        for proc in helpers:
            proc.terminate()
            proc.wait(timeout=30)
        cluster.stop()
    print(f"\n{'path':<48} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in results.items():
        print(f"{name:<48} {row['rate']:>8.1f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f}")
    names = list(results)
    end_to_end = results[names[1]]["rate"] / results[names[0]]["rate"]
    submit = results[names[3]]["rate"] / results[names[2]]["rate"]
    print(f"\n{args.clients} clients, {args.jobs} calls a path; latency = submit, or round trip for Celery")
    print(
        f"echo end to end / raw Celery = {end_to_end:.2f}x; gemmaq submit / minimal endpoint = {submit:.2f}x"
    )


if __name__ == "__main__":
    main()

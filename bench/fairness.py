"""Fairness: one user floods a variant; another user's occasional job must not wait behind it.

    .venv/bin/python bench/fairness.py [--flood 400] [--probes 20] [--new-tokens 32] [--flood-priority 5]

On a stack of its own (one CPU worker, gemma-3-270m), in one run:
- idle: user B submits one job a second (`--probes` of them), nothing else running;
- loaded: user A submits `--flood` jobs at once (same variant and length, at `--flood-priority`;
  B's jobs are at the default, 5), then B submits one job a second again while A's backlog
  drains. Neither user has a `max_priority` of its own: A's priority 9 ranks as a 5 among B's.
B's latency is submit → terminal state, as B sees it (`GET ?wait=`). Prints B's p50/p95 idle and
loaded, A's backlog when B's last job ended, and the headline: loaded p95 / idle p95.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import Cluster  # noqa: E402
from bench.throughput import prompts  # noqa: E402
from core.schemas import TERMINAL_STATUSES  # noqa: E402


def body(text: str, new_tokens: int, priority: int = 5) -> dict[str, Any]:
    return {
        "variant": "gemma-3-270m",
        "input": {"prompt": text},
        "params": {"max_new_tokens": new_tokens},
        "priority": priority,
    }


def probe(client: httpx.Client, count: int, new_tokens: int) -> list[float]:
    """One job a second; each one's latency, submit to terminal state (s)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        started = time.perf_counter()
        job = client.post("/v1/jobs", json=body(prompts(count)[i], new_tokens)).json()
        while job["status"] not in TERMINAL_STATUSES:
            job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
        assert job["status"] == "succeeded", job
        with lock:
            latencies.append(time.perf_counter() - started)

    with ThreadPoolExecutor(count) as pool:
        for i in range(count):
            pool.submit(one, i)
            time.sleep(1.0)
    return latencies


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=400)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--flood-priority", type=int, default=5, choices=range(10), metavar="0-9")
    args = parser.parse_args()
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gemmaq-bench-")), variants="gemma-3-270m", workers=1,
                      log_level="WARNING")  # fmt: skip
    try:
        print("starting the stack (own PostgreSQL and Redis, API, reconciler, one CPU worker)…", flush=True)
        cluster.start()
        keys = {}
        for user in ("flooder", "prober"):
            out = cluster.cli("users", "create", user, "--requests-per-minute", "100000",
                              "--max-concurrent-jobs", str(args.flood + args.probes))  # fmt: skip
            keys[user] = out.strip().splitlines()[-1]
        a, b = (
            httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {keys[u]}"}, timeout=120)
            for u in ("flooder", "prober")
        )
        probe(b, 2, args.new_tokens)  # warm-up
        print("B alone…", flush=True)
        idle = probe(b, args.probes, args.new_tokens)
        print(f"A floods {args.flood} jobs at priority {args.flood_priority}…", flush=True)
        flood = prompts(args.flood)
        with ThreadPoolExecutor(16) as pool:
            sent = pool.map(
                lambda t: a.post("/v1/jobs", json=body(t, args.new_tokens, args.flood_priority)), flood
            )
            codes = [r.status_code for r in sent]
        assert codes == [202] * args.flood, sorted(set(codes))
        print("B under the flood…", flush=True)
        loaded = probe(b, args.probes, args.new_tokens)
        backlog = a.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()
        left = len(backlog["data"]) if not backlog["has_more"] else "100+"
    finally:
        cluster.stop()
    print(f"\n{'B (one job a second)':<28} {'jobs':>5} {'p50 s':>7} {'p95 s':>7}")
    for name, values in (("idle", idle), (f"under A's flood of {args.flood}", loaded)):
        print(f"{name:<28} {len(values):>5} {statistics.median(values):>7.2f} {p95(values):>7.2f}")
    print(f"\nA's jobs still queued when B's last job ended: {left}")
    print(f"B's p95 loaded / idle = {p95(loaded) / p95(idle):.2f}x")


if __name__ == "__main__":
    main()

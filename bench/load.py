"""Load: 1, 8, 32 and 128 concurrent clients against one worker, as a table and a chart.

    .venv/bin/python bench/load.py [--clients 1,8,32,128] [--new-tokens 32] [--device cpu]
                                   [--variant gemma-3-270m] [--chart load.png]

Each level is a closed loop: every client submits a text job, waits for its result
(`GET /v1/jobs/{id}?wait=60`) and submits the next, until the level's jobs are done
(`--rounds` per client, at least `--min-jobs` in all). The whole system runs: HTTP →
PostgreSQL → Redis → a worker (the shell and its engine process) → PostgreSQL → HTTP.

Per level: tokens/s (output tokens of all its jobs / wall time from its first submit to its
last result), p50/p95 latency (submit → result, as the client sees it) and p50/p95 time to
first token (queue wait + the engine's time to the first token, from the jobs' metrics). The
last line compares the top level with the 32-client one: throughput should hold under load.
The chart (matplotlib) draws the same figures against the number of clients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
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

TERMINAL = TERMINAL_STATUSES


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(cluster: Cluster, clients: int, jobs: int, new_tokens: int, variant: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {cluster.key}"}
    texts = prompts(jobs)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    with httpx.Client(base_url=cluster.url, headers=headers, timeout=600, limits=limits) as client:

        def one(text: str) -> tuple[float, dict[str, Any]]:
            body = {"variant": variant, "input": {"prompt": text}, "params": {"max_new_tokens": new_tokens}}
            start = time.perf_counter()
            job_id = client.post("/v1/jobs", json=body).raise_for_status().json()["id"]
            while True:
                job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
                if job["status"] in TERMINAL:
                    return time.perf_counter() - start, job

        def worker(index: int) -> list[tuple[float, dict[str, Any]]]:
            return [one(texts[i]) for i in range(index, jobs, clients)]

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = [r for rs in pool.map(worker, range(clients)) for r in rs]
        wall = time.perf_counter() - started
    failed = [job for _, job in done if job["status"] != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}")
    tokens = sum(job["result"]["usage"]["output_tokens"] for _, job in done)
    metrics = [job["metrics"] for _, job in done]
    ttft = [(m["queue_ms"] + (m["time_to_first_token_ms"] or 0)) / 1000 for m in metrics]
    latency = [seconds for seconds, _ in done]
    return {
        "clients": clients,
        "jobs": jobs,
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "p50": statistics.median(latency),
        "p95": percentile(latency, 0.95),
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": percentile(ttft, 0.95),
        "batch": max(job["metrics"]["batch_size"] or 0 for _, job in done),
    }


def draw(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["clients"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].plot(clients, [r["tokens_per_s"] for r in rows], marker="o")
    axes[0].set(title="throughput", ylabel="output tokens/s")
    axes[1].plot(clients, [r["p50"] for r in rows], marker="o", label="p50")
    axes[1].plot(clients, [r["p95"] for r in rows], marker="o", label="p95")
    axes[1].set(title="latency (submit → result)", ylabel="seconds")
    axes[2].plot(clients, [r["ttft_p50"] for r in rows], marker="o", label="p50")
    axes[2].plot(clients, [r["ttft_p95"] for r in rows], marker="o", label="p95")
    axes[2].set(title="time to first token (with queueing)", ylabel="seconds")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].legend()
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32,128")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="jobs per client at each level")
    parser.add_argument("--min-jobs", type=int, default=16, help="jobs at each level, at least")
    parser.add_argument("--variant", default="gemma-3-270m")
    parser.add_argument("--device", default="cpu", help="the worker's --device: cpu, cuda or auto")
    parser.add_argument("--chart", type=Path, default=Path("load.png"))
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gemmaq-bench-")), variants=args.variant, workers=1,
                      log_level="WARNING", device=args.device)  # fmt: skip
    rows = []
    try:
        print(f"starting the stack (own PostgreSQL and Redis, API, reconciler, one {args.device} worker)…",
              flush=True)  # fmt: skip
        cluster.start()
        run_level(cluster, 1, 2, 4, args.variant)  # warm-up: connections, the first batch
        for clients in levels:
            jobs = max(args.min_jobs, clients * args.rounds)
            rows.append(run_level(cluster, clients, jobs, args.new_tokens, args.variant))
            print(f"  {clients} clients: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        cluster.stop()
    print(f"\n{args.variant} on {args.device}, {args.new_tokens} new tokens a job, greedy")
    print(f"{'clients':>7} {'jobs':>5} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} {'ttft p50':>9} "
          f"{'ttft p95':>9} {'batch':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['clients']:>7} {r['jobs']:>5} {r['tokens_per_s']:>9.1f} {r['p50']:>7.2f} {r['p95']:>7.2f} "
              f"{r['ttft_p50']:>9.2f} {r['ttft_p95']:>9.2f} {r['batch']:>6}")  # fmt: skip
    draw(rows, args.chart, f"gemmaq: {args.variant} on {args.device}, {args.new_tokens} new tokens a job")
    print(f"\nchart: {args.chart.resolve()}")
    by = {r["clients"]: r for r in rows}
    if 32 in by and max(by) > 32:
        top = by[max(by)]
        ratio = top["tokens_per_s"] / by[32]["tokens_per_s"]
        print(f"{top['clients']} clients / 32 clients throughput = {ratio:.2f}x")


if __name__ == "__main__":
    main()

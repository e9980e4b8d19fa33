"""Chaos run: push N jobs through gemmaq while killing workers and restarting Redis and PostgreSQL,
then audit PostgreSQL and Redis.

    .venv/bin/python bench/chaos.py --jobs 300 --faults 6

It starts its own PostgreSQL and Redis (gemmaq.servers: pip-installed binaries, own ports and
folders), an API, the reconciler and two workers (gemma-3-270m + echo, CPU), and never touches
the machine's shared services. Every job is submitted with an Idempotency-Key and retried until
the API answers 202, as a well-behaved client does through an outage. Faults, one at a time at
random moments: SIGKILL of a worker (a new one starts), SIGTERM of a worker (likewise), SIGKILL
of a worker's engine process (its shell starts a new one and resends what it held), Redis
killed and restarted empty, PostgreSQL crashed (immediate stop) and restarted.

    .venv/bin/python bench/chaos.py --ha --jobs 300 --faults 8

`--ha` runs Redis as a Sentinel group (a master, a replica, three sentinels) and PostgreSQL as
a primary with a streaming standby (a two-host URL), and adds two kinds after those above: a
Redis failover (the master SIGKILLed while its replica is held back, or, every other time, a
SENTINEL FAILOVER with both alive) and a PostgreSQL failover (the primary crashed, the standby
promoted, a new standby made). A Redis restart then kills the master and brings it back empty.

The audit: jobs by status; jobs not terminal or never written (lost); jobs with more than one
completed attempt (duplicates); the usage ledger against the sum of the jobs' usage; concurrency
slots still held. Exit status 0 only when nothing is lost, nothing is duplicated, the ledger
equals usage and no slot is held.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import NAMESPACE, Cluster  # noqa: E402
from core.schemas import TERMINAL_STATUSES  # noqa: E402

TERMINAL = TERMINAL_STATUSES


def submit_all(cluster: Cluster, count: int, accepted: dict[int, str], done: threading.Event) -> None:
    """Submit every job, retrying through outages with the same Idempotency-Key until it is 202."""
    headers = {"Authorization": f"Bearer {cluster.key}"}
    rng = random.Random(7)
    with httpx.Client(base_url=cluster.url, headers=headers, timeout=10) as client:
        for i in range(count):
            real = rng.random() < 0.5
            body: dict[str, Any] = {
                "variant": "gemma-3-270m" if real else "echo",
                "input": {"prompt": f"Chaos job {i}: the quick brown fox jumps over the lazy dog."},
                "params": {"max_new_tokens": 32 if real else 16},
                "metadata": {"chaos": str(i)},
            }
            while True:
                try:
                    response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"chaos-{i}"})
                    if response.status_code == 202:
                        accepted[i] = response.json()["id"]
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            time.sleep(rng.uniform(0.0, 0.12))
    done.set()


def inject(cluster: Cluster, faults: int, submitted: threading.Event, log: list[str]) -> None:
    rng = random.Random(11)
    kinds = [
        "kill-worker",
        "restart-redis",
        "restart-postgres",
        "term-worker",
        "kill-engine",
        "restart-redis",
    ]
    if cluster.sentinels is not None:  # --ha: the failovers, after the kinds above
        kinds += ["redis-failover", "postgres-failover"]
    failovers = 0
    for n in range(faults):
        time.sleep(rng.uniform(3, 8))
        kind = kinds[n % len(kinds)]
        started = time.monotonic()
        if kind in ("kill-worker", "term-worker"):
            name = cluster.busy_worker(rng)
            proc = cluster.workers.pop(name)
            proc.send_signal(signal.SIGKILL if kind == "kill-worker" else signal.SIGTERM)
            proc.wait(timeout=120)
            cluster.add_worker()
            detail = name
        elif kind == "kill-engine":  # the worker's shell stays; it starts a new engine itself
            name = cluster.busy_worker(rng)
            pid = cluster.engine_pid(name)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            detail = f"{name}'s engine, pid {pid}"
        elif kind == "restart-redis" and cluster.sentinels is not None:
            master = cluster.sentinels.master()  # killed, back empty: the sentinels promote the replica
            master.signal(signal.SIGKILL)
            time.sleep(rng.uniform(2, 5))
            master.start()
            cluster.sentinels.wait_settled()
            detail = f"master :{master.port} down, back empty (as a replica)"
        elif kind == "restart-redis":
            cluster.redis.stop()
            time.sleep(rng.uniform(2, 5))
            cluster.redis.start()
            detail = "down, back empty"
        elif kind == "redis-failover":
            assert cluster.sentinels is not None
            master, replica = cluster.sentinels.master(), cluster.sentinels.replica()
            if failovers % 2 == 0:  # the replica held back, so it misses the master's last writes
                replica.signal(signal.SIGSTOP)
                time.sleep(2)
                master.signal(signal.SIGKILL)
                time.sleep(0.3)
                replica.signal(signal.SIGCONT)
                cluster.sentinels.wait_master(replica)
                master.start()
                detail = f"master :{master.port} killed behind its replica, :{replica.port} promoted"
            else:  # both alive: connections still open to the demoted master hit READONLY
                cluster.sentinels.failover()
                cluster.sentinels.wait_master(replica)
                detail = f"SENTINEL FAILOVER to :{replica.port}"
            cluster.sentinels.wait_settled()
            failovers += 1
        elif kind == "postgres-failover":
            old = cluster.pg.port
            cluster.fail_over_postgres()
            detail = f"primary :{old} crashed, standby :{cluster.pg.port} promoted, a new standby made"
        else:
            cluster.pg.stop()
            time.sleep(rng.uniform(2, 5))
            cluster.pg.start()
            detail = "crashed, restarted"
        took = time.monotonic() - started
        log.append(f"{time.strftime('%H:%M:%S')} fault {n + 1}: {kind} ({detail}, {took:.1f} s)")
        print(log[-1], flush=True)


def audit(cluster: Cluster, accepted: dict[int, str], timeout: float) -> dict[str, Any]:
    ids = list(accepted.values())
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(cluster.env["GEMMAQ_DATABASE_URL"]) as conn:
            rows = conn.execute("SELECT id, status FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()
        statuses: dict[str, str] = {str(k): str(v) for k, v in rows}
        open_jobs = [j for j in ids if statuses.get(j) not in TERMINAL]
        if not open_jobs or time.monotonic() > deadline:
            break
        time.sleep(1)

    def one(conn: psycopg.Connection[Any], query: str) -> int:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0

    with psycopg.connect(cluster.env["GEMMAQ_DATABASE_URL"]) as conn:
        completed = conn.execute(
            "SELECT job_id, count(*) FROM job_metrics WHERE job_id = ANY(%s) AND output_tokens IS NOT NULL "
            "GROUP BY job_id HAVING count(*) > 1",
            (ids,),
        ).fetchall()
        usage = one(  # a result's usage, or what a job that ended without one was charged
            conn,
            "SELECT coalesce(sum(CASE WHEN j.result ? 'usage'"
            " THEN (j.result->'usage'->>'input_tokens')::bigint"
            " + (j.result->'usage'->>'output_tokens')::bigint"
            " ELSE coalesce(m.input_tokens, 0) + coalesce(m.output_tokens, 0) END), 0)"
            " FROM jobs j LEFT JOIN job_metrics m ON m.job_id = j.id AND m.attempt = j.attempts",
        )
        ledger = one(conn, "SELECT coalesce(sum(input_tokens + output_tokens), 0) FROM usage_ledger")
        attempts = Counter(a for (a,) in conn.execute("SELECT attempts FROM jobs WHERE id = ANY(%s)", (ids,)))
        rows_total = one(conn, "SELECT count(*) FROM jobs")
    events: Counter[str] = Counter()
    for log in cluster.folder.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line).get("event", "")
                if event in ("job.requeued", "job.resent", "job.returned", "worker.consumer_lost"):
                    events[event] += 1
    time.sleep(3)  # the reconciler's sweep releases slots of jobs whose worker died before settling
    client = cluster.redis_client()
    slots = sum(int(client.hlen(k)) for k in client.scan_iter(match=f"{NAMESPACE}:quota:*:active"))
    return {
        "accepted": len(ids),
        "job_rows": rows_total,
        "by_status": dict(Counter(statuses.get(j, "missing") for j in ids)),
        "lost": len(open_jobs),
        "duplicates": len(completed),
        "attempts": dict(sorted(attempts.items())),
        "usage_tokens": int(usage),
        "ledger_tokens": int(ledger),
        "open_concurrency_slots": slots,
        "recoveries": dict(events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--faults", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for every job to end")
    parser.add_argument(
        "--ha", action="store_true", help="Redis Sentinel and a PostgreSQL standby, and their failovers"
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gemmaq-chaos-"))
    cluster = Cluster(folder, fast_failover=True, ha=args.ha)
    started = time.monotonic()
    try:
        print(f"starting PostgreSQL, Redis, API, reconciler and 2 workers (logs in {folder})", flush=True)
        cluster.start()
        accepted: dict[int, str] = {}
        submitted = threading.Event()
        faults: list[str] = []
        feeder = threading.Thread(target=submit_all, args=(cluster, args.jobs, accepted, submitted))
        feeder.start()
        inject(cluster, args.faults, submitted, faults)
        feeder.join()
        print(f"all {args.jobs} jobs accepted after {time.monotonic() - started:.0f} s; waiting for the last",
              flush=True)  # fmt: skip
        report = audit(cluster, accepted, args.timeout)
    finally:
        cluster.stop()
    report |= {"faults": len(faults), "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(report, indent=2))
    ok = (
        report["lost"] == 0
        and report["duplicates"] == 0
        and report["usage_tokens"] == report["ledger_tokens"]
        and report["open_concurrency_slots"] == 0
        and report["accepted"] == args.jobs
        and report["faults"] >= args.faults
    )
    print("chaos audit:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

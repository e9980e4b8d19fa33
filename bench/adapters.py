"""LoRA adapters in the batch: bench/mixed.py's workload with 4 adapters mixed in, against none.

    .venv/bin/python bench/adapters.py [--jobs 32] [--rounds 2] [--min-tokens 16] [--max-tokens 256]

One stack (own PostgreSQL and Redis, API, reconciler, one CPU worker, gemma-3-270m). Four random
rank-16 adapters on the attention projections (q, k, v, o) are uploaded through POST /v1/adapters.
Then, in alternating rounds, the same jobs are submitted at once end to end (bench/mixed.py's
workload: each job its own max_new_tokens, drawn min..max, seeded, greedy):
- `none`: every job on the base model;
- `adapters`: jobs round-robin over the 4 adapters and the base (4 in 5 through an adapter), so
  that every step batches rows of several adapters and of none.
Each side is pooled over its rounds (tokens / seconds). The adapters are loaded once by a warm-up
job each before the first round: the rounds measure serving, not the first read of an adapter.
The last line: `adapters: ratio=R.RRx`, tokens/s with adapters over tokens/s without.
"""

from __future__ import annotations

import argparse
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
from bench.mixed import workload, workload_args  # noqa: E402
from core.schemas import TERMINAL_STATUSES  # noqa: E402
from tests.helpers.adapters import ATTENTION_SHAPES_270M, packed, random_adapter  # noqa: E402

ADAPTERS = 4
RANK = 16


def upload(client: httpx.Client, folder: Path) -> str:
    files = {"file": (f"{folder.name}.tar.gz", packed(folder), "application/gzip")}
    response = client.post("/v1/adapters", files=files, data={"name": folder.name, "base": "gemma-3-270m"})
    assert response.status_code == 201, response.text
    return str(response.json()["name"])


def run_round(
    client: httpx.Client, texts: list[str], limits: list[int], adapters: list[str | None]
) -> dict[str, Any]:
    """Every job at once, job i through adapters[i % len(adapters)]."""

    def one(i: int) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": limits[i]}
        if (adapter := adapters[i % len(adapters)]) is not None:
            params["adapter"] = adapter
        job_id = client.post("/v1/jobs", json={"input": {"prompt": texts[i]}, "params": params}).json()["id"]
        while True:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            if job["status"] in TERMINAL_STATUSES:
                return job

    started = time.perf_counter()
    with ThreadPoolExecutor(len(texts)) as pool:
        jobs = list(pool.map(one, range(len(texts))))
    seconds = time.perf_counter() - started
    assert all(j["status"] == "succeeded" for j in jobs), [(j["status"], j.get("error")) for j in jobs]
    return {"tokens": sum(j["result"]["usage"]["output_tokens"] for j in jobs), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_args(parser)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    texts, limits = workload(args)
    work = Path(tempfile.mkdtemp(prefix="gemmaq-bench-"))
    cluster = Cluster(work, variants="gemma-3-270m", workers=1, log_level="WARNING")
    sides: dict[str, list[dict[str, Any]]] = {"none": [], "adapters": []}
    try:
        print("starting the stack (own PostgreSQL and Redis, API, reconciler, one CPU worker)…", flush=True)
        cluster.start()
        with httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {cluster.key}"},
                          timeout=600) as client:  # fmt: skip
            names: list[str | None] = []
            for i in range(ADAPTERS):
                folder = work / f"bench-lora-{i}"
                random_adapter(folder, layers=18, shapes=ATTENTION_SHAPES_270M, rank=RANK, seed=100 + i)
                names.append(upload(client, folder))
            mix = [*names, None]
            run_round(client, texts[: len(mix)], [4] * len(mix), mix)  # warm-up: each adapter read once
            for r in range(args.rounds):
                plain: list[str | None] = [None]
                for side, adapters in (("none", plain), ("adapters", mix)):
                    row = run_round(client, texts, limits, adapters)
                    sides[side].append(row)
                    print(f"round {r + 1} {side:<9} {row['tokens']:>6} tokens {row['seconds']:>7.2f} s "
                          f"{row['tokens'] / row['seconds']:>7.1f} tok/s", flush=True)  # fmt: skip
    finally:
        cluster.stop()
    rate = {
        side: sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows) for side, rows in sides.items()
    }
    print(f"\n{args.jobs} jobs, max_new_tokens {args.min_tokens}..{args.max_tokens}, {args.rounds} rounds "
          f"a side; {ADAPTERS} rank-{RANK} adapters on q/k/v/o, 4 jobs in 5 through one")  # fmt: skip
    print(f"none:     {rate['none']:.1f} tok/s (pooled)")
    print(f"adapters: {rate['adapters']:.1f} tok/s (pooled)")
    print(f"adapters: ratio={rate['adapters'] / rate['none']:.2f}x")


if __name__ == "__main__":
    main()

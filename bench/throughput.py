"""Throughput: 32 concurrent text jobs through the whole system against two references, one run.

    .venv/bin/python bench/throughput.py [--jobs 32] [--new-tokens 64] [--baseline-jobs 8] [--rounds 3]

- system: HTTP → PostgreSQL → Redis → worker (dynamic batches) → PostgreSQL → HTTP, gemma-3-270m
  on the CPU; tokens/s = output tokens of all jobs / wall time from the first submit to the
  last result.
- one at a time (no batching at all): this process loads the same weights and calls
  `generate` once per request, one after another (`--baseline-jobs` of them; tokens/s is a rate,
  so fewer requests measure it as well).
- bare batched generate: the same prompts in batches of the size the worker used (its jobs'
  `batch_size`), `generate` directly.

Greedy decoding, `max_new_tokens` the same for all three; the tokens counted are the tokens each
produced. The machine's speed drifts from minute to minute, so the system and bare batched
`generate` are measured in alternating rounds (`--rounds`, 3) within one run and each is pooled
over its rounds; while a reference runs, the stack's own processes are stopped (SIGSTOP), so
the reference has the machine to itself. The last line is the headline: system / one-at-a-time
and system / bare batched.
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
from core.schemas import TERMINAL_STATUSES  # noqa: E402

TOPICS = ["lighthouses", "glaciers", "bread", "trains", "volcanoes", "libraries", "bees", "rivers"]


def prompts(count: int) -> list[str]:
    return [f"Here is a long essay about {TOPICS[i % len(TOPICS)]}, part {i + 1}:\n\n" for i in range(count)]


def run_system(cluster: Cluster, texts: list[str], new_tokens: int | list[int]) -> dict[str, Any]:
    """All the texts submitted at once (`new_tokens` for each, or one limit per text)."""
    headers = {"Authorization": f"Bearer {cluster.key}"}
    limits = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(texts)
    with httpx.Client(base_url=cluster.url, headers=headers, timeout=600) as client:

        def one(text: str, limit: int = 8) -> dict[str, Any]:
            body = {"input": {"prompt": text}, "params": {"max_new_tokens": limit}}
            job_id = client.post("/v1/jobs", json=body).json()["id"]
            while True:
                job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
                if job["status"] in TERMINAL_STATUSES:
                    return job

        # Warm the path once (connections, first batch) so the measured run is steady state.
        one("Warm-up.")
        started = time.perf_counter()
        with ThreadPoolExecutor(len(texts)) as pool:
            jobs = list(pool.map(one, texts, limits))
        seconds = time.perf_counter() - started
    assert all(j["status"] == "succeeded" for j in jobs), [j["status"] for j in jobs]
    tokens = sum(j["result"]["usage"]["output_tokens"] for j in jobs)
    sizes = [j["metrics"]["batch_size"] for j in jobs]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "batch_size": max(sizes),
        "mean_batch": statistics.mean(sizes),
    }


def load_model(dtype: Any = None, *, stock: bool = False) -> tuple[Any, Any]:
    """gemma-3-270m's converted weights and tokenizer (left padding), in the worker's CPU dtype
    unless `dtype` says otherwise. As the worker loads it (its linear layers prepacked for the
    CPU), or as transformers alone does with `stock`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.settings import Settings
    from core.variants import load_variants
    from workers.engine.loading import LOCAL, load_dtype, weights_dir

    settings = Settings()
    registry = load_variants(None)
    variant = registry.get("gemma-3-270m")
    assert variant is not None
    path = weights_dir(variant, registry, settings.model_cache)
    tokenizer = AutoTokenizer.from_pretrained(path, **LOCAL)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or load_dtype(variant, "cpu"), attn_implementation="sdpa", **LOCAL
    )
    if not stock:
        from workers.engine.memory import freeze
        from workers.engine.packing import pack_linears

        pack_linears(model)
        freeze()  # as the engine does after a load
    return model.eval(), tokenizer


def run_generate(model: Any, tokenizer: Any, texts: list[str], new_tokens: int, batch: int) -> dict[str, Any]:
    import torch

    tokens = 0
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        inputs = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        generated = out[:, inputs["input_ids"].shape[1] :]
        for row in generated.tolist():
            kept = 0
            for token in row:
                if token in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    break
                kept += 1
            tokens += kept
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "batch_size": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--baseline-jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="system and bare rounds, alternating")
    args = parser.parse_args()
    texts = prompts(args.jobs)
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gemmaq-bench-")), variants="gemma-3-270m", workers=1,
                      log_level="WARNING")  # fmt: skip
    systems: list[dict[str, Any]] = []
    bares: list[dict[str, Any]] = []
    try:
        print("starting the stack (own PostgreSQL and Redis, API, reconciler, one CPU worker)…", flush=True)
        cluster.start()
        model, tokenizer = load_model()
        for _ in range(args.rounds):
            systems.append(run_system(cluster, texts, args.new_tokens))
            cluster.pause()  # the references run on a machine as quiet as one without the stack
            try:
                if not bares:
                    run_generate(model, tokenizer, texts[:1], 8, 1)  # warm-up
                    single = run_generate(model, tokenizer, texts[: args.baseline_jobs], args.new_tokens, 1)
                batch = systems[-1]["batch_size"]
                bares.append(run_generate(model, tokenizer, texts, args.new_tokens, batch))
            finally:
                cluster.resume()
            print(f"round {len(bares)}: end to end {rate(systems[-1]):.1f} tok/s, "
                  f"bare batched {rate(bares[-1]):.1f} tok/s", flush=True)  # fmt: skip
    finally:
        cluster.stop()
    system, batched = pooled(systems), pooled(bares)
    rows = [
        ("one at a time (generate per request)", single),
        (f"bare batched generate (batch {system['batch_size']})", batched),
        (f"gemmaq end to end ({args.jobs} concurrent jobs)", system),
    ]
    print(f"\n{'path':<46} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for name, row in rows:
        print(f"{name:<46} {row['tokens']:>7} {row['seconds']:>8.2f} {rate(row):>9.1f}")
    print(f"\nworker batches: largest {system['batch_size']}, mean size per job {system['mean_batch']:.1f}")
    print(
        f"system / one-at-a-time = {rate(system) / rate(single):.2f}x; "
        f"system / bare batched generate = {rate(system) / rate(batched):.2f}x"
    )


def rate(row: dict[str, Any]) -> float:
    return float(row["tokens"] / row["seconds"])


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds as one run: their tokens over their seconds."""
    return {
        "tokens": sum(r["tokens"] for r in rounds),
        "seconds": sum(r["seconds"] for r in rounds),
        "batch_size": max(r["batch_size"] for r in rounds),
        "mean_batch": statistics.mean(r.get("mean_batch", r["batch_size"]) for r in rounds),
    }


if __name__ == "__main__":
    main()

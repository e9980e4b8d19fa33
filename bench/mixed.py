"""Mixed lengths: continuous batching against static batches that wait for their longest member.

    .venv/bin/python bench/mixed.py [--jobs 32] [--min-tokens 16] [--max-tokens 256] [--seed 7]

Every job asks for its own `max_new_tokens`, drawn from min..max (seeded), greedy. In one run:
- gemmaq end to end: the jobs submitted at once through the whole system (HTTP → PostgreSQL →
  Redis → a worker that batches continuously → PostgreSQL → HTTP), gemma-3-270m on the CPU.
- static batching: in this process, `generate` on batches of the worker's `max_batch_size` in
  submission order; a batch decodes until its longest member is done (each row counts only
  the tokens it asked for) — how the worker batched before, and how a static batcher does.
- gemmaq's continuous decoder alone (workers/engine/continuous.py), in this process: up to
  `max_batch_size` rows, a finished row's slot refilled at the next step.
- transformers' continuous-batching manager (`init_continuous_batching`, paged attention), in
  this process, with the same cap on requests per batch.

Useful tokens/s = the tokens each job produced (its own limit, or eos) / wall time. The last line
is the headline: gemmaq end to end over static batching, and both continuous engines over it.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import Cluster  # noqa: E402
from bench.throughput import load_model, prompts, run_system  # noqa: E402

BATCH = 8  # gemma-3-270m's max_batch_size in core/variants.toml


def run_static(model: Any, tokenizer: Any, texts: list[str], limits: list[int]) -> dict[str, Any]:
    import torch

    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    tokens, started = 0, time.perf_counter()
    for i in range(0, len(texts), BATCH):
        inputs = tokenizer(texts[i : i + BATCH], return_tensors="pt", padding=True)
        own = limits[i : i + BATCH]
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max(own), do_sample=False)
        for row, limit in zip(out[:, inputs["input_ids"].shape[1] :].tolist(), own, strict=True):
            tokens += next((n for n, t in enumerate(row[:limit]) if t in eos), len(row[:limit]))
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def never_cancelled(job_ids: Sequence[str]) -> list[float | None]:
    return [None] * len(job_ids)


def run_own(model: Any, tokenizer: Any, texts: list[str], limits: list[int]) -> dict[str, Any]:
    from core.schemas import GenerationParams
    from workers.engine.continuous import ContinuousDecoder, results_of
    from workers.engine.generation import Decoder
    from workers.shared.base import Request

    plain = Decoder(model=model, tokenizer=tokenizer, device=model.device)
    decoder = ContinuousDecoder(plain, max_rows=BATCH)
    pending = [
        (i, Request(job_id=f"m{i}", messages=None, prompt=t, params=GenerationParams(max_new_tokens=n)))
        for i, (t, n) in enumerate(zip(texts, limits, strict=True))
    ]
    tokens, started = 0, time.perf_counter()
    while pending or decoder.rows:
        joining, pending = pending[: decoder.free], pending[decoder.free :]
        done = decoder.join([(i, r, tokenizer(r.prompt)["input_ids"]) for i, r in joining])
        if decoder.rows:
            done = [*done, *decoder.step(never_cancelled)]
        tokens += sum(result.output_tokens for _, result in results_of(done))
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def run_transformers_cb(model: Any, tokenizer: Any, texts: list[str], limits: list[int]) -> dict[str, Any]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    model.set_attn_implementation("sdpa")  # the manager refuses gemmaq's (set by run_own's decoder)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max(limits), eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    manager = model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=BATCH),
    )
    manager.start()
    try:
        started = time.perf_counter()
        for i, (text, limit) in enumerate(zip(texts, limits, strict=True)):
            manager.add_request(tokenizer(text)["input_ids"], request_id=f"r{i}", max_new_tokens=limit)
        tokens, finished = 0, 0
        while finished < len(texts):
            output = manager.get_result(timeout=60)
            if output is None:
                raise SystemExit("transformers' manager stopped answering")
            if output.is_finished():
                finished += 1
                tokens += sum(1 for t in output.generated_tokens if t not in eos)
        return {"tokens": tokens, "seconds": time.perf_counter() - started}
    finally:
        manager.stop(block=True)


def workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload's options (bench/adapters.py runs the same workload)."""
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=7)


def workload(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The prompts, and each one's own max_new_tokens (seeded draw from min..max)."""
    rng = random.Random(args.seed)
    texts = prompts(args.jobs)
    return texts, [rng.randint(args.min_tokens, args.max_tokens) for _ in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_args(parser)
    args = parser.parse_args()
    texts, limits = workload(args)
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gemmaq-bench-")), variants="gemma-3-270m", workers=1,
                      log_level="WARNING")  # fmt: skip
    try:
        print("starting the stack (own PostgreSQL and Redis, API, reconciler, one CPU worker)…", flush=True)
        cluster.start()
        system = run_system(cluster, texts, limits)
    finally:
        cluster.stop()
    model, tokenizer = load_model()
    stock, _ = load_model(stock=True)  # transformers' manager runs on the model as transformers loads it
    run_static(model, tokenizer, texts[:1], [4])  # warm-up
    rows = [
        (f"static batches of {BATCH} (bare generate)", run_static(model, tokenizer, texts, limits)),
        (f"gemmaq continuous decoder alone ({BATCH} slots)", run_own(model, tokenizer, texts, limits)),
        ("transformers continuous batching manager", run_transformers_cb(stock, tokenizer, texts, limits)),
        (f"gemmaq end to end ({args.jobs} concurrent jobs)", system),
    ]
    print(f"\nmax_new_tokens {args.min_tokens}..{args.max_tokens}: {sum(limits)} tokens asked, mean "
          f"{sum(limits) / len(limits):.0f}")  # fmt: skip
    print(f"{'path':<46} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    rate = {}
    for name, row in rows:
        rate[name] = row["tokens"] / row["seconds"]
        print(f"{name:<46} {row['tokens']:>7} {row['seconds']:>8.2f} {rate[name]:>9.1f}")
    static, own, hf, end_to_end = (rate[name] for name, _ in rows)
    print(
        f"\ngemmaq end to end / static = {end_to_end / static:.2f}x; continuous decoder / static = "
        f"{own / static:.2f}x; transformers manager / static = {hf / static:.2f}x"
    )


if __name__ == "__main__":
    main()

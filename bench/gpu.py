"""The worker's text engine on a CUDA device: tokens/s and peak GPU memory per batch size and precision.

    .venv/bin/python bench/gpu.py [--batches 1,2,4,8,16,32,64] [--new-tokens 64] [--device cuda:0]

For gemma-3-270m in bf16, int8 and nf4 (bitsandbytes), loaded by the worker's own loader
(workers/engine/loading.py): at each batch size, that many prompts decoded greedily to
`--new-tokens` by the worker's continuous decoder (all rows joining at once), and by bare batched
`generate` for reference. Prints tokens/s for both and the peak memory `torch.cuda` saw.
Needs a CUDA device (the `device` tool lends one); exits with a message without it.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import prompts  # noqa: E402


def never_cancelled(job_ids: Sequence[str]) -> list[float | None]:
    return [None] * len(job_ids)


def engine_rate(engine: Any, batch: int, new_tokens: int) -> float:
    from core.schemas import GenerationParams
    from workers.shared.base import Request

    stream = engine.stream()
    stream.max_rows = batch
    requests = [
        Request(job_id=f"g{i}", messages=None, prompt=t, params=GenerationParams(max_new_tokens=new_tokens))
        for i, t in enumerate(prompts(batch))
    ]
    started = time.perf_counter()
    done = list(stream.join([(r.job_id, r, engine.encode(r)) for r in requests]))
    while stream.rows:
        done += stream.step(never_cancelled)
    tokens: int = sum(result.output_tokens for _, result in done)
    return tokens / (time.perf_counter() - started)


def generate_rate(engine: Any, batch: int, new_tokens: int) -> float:
    import torch

    tokenizer, model = engine.tokenizer, engine.decoder.model
    inputs = tokenizer(prompts(batch), return_tensors="pt", padding=True).to(engine.device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - started)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this where a GPU is lent (see bench/README.md)")
    from core.settings import Settings
    from core.variants import load_variants
    from workers.engine.loading import load_engine

    settings, registry = Settings(), load_variants(None)
    base = registry.get("gemma-3-270m")
    assert base is not None
    sizes = [int(b) for b in args.batches.split(",")]
    gpu = torch.cuda.get_device_name(args.device)
    print(f"{gpu}, torch {torch.__version__}, {args.new_tokens} new tokens")
    print(f"\n{'precision':<9} {'batch':>5} {'engine tok/s':>13} {'generate tok/s':>15} {'peak MiB':>9}")
    for precision in ("none", "int8", "nf4"):
        cap = max(sizes)
        variant = base.model_copy(
            update={"quantization": precision, "max_batch_size": cap, "max_batch_size_cuda": cap}
        )
        engine = load_engine(variant, registry, device=args.device, cache_root=settings.model_cache)
        engine.warmup()
        for batch in sizes:
            torch.cuda.reset_peak_memory_stats(args.device)
            own = engine_rate(engine, batch, args.new_tokens)
            bare = generate_rate(engine, batch, args.new_tokens)
            peak = torch.cuda.max_memory_allocated(args.device) / 2**20
            name = "bf16" if precision == "none" else precision
            print(f"{name:<9} {batch:>5} {own:>13.1f} {bare:>15.1f} {peak:>9.0f}", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

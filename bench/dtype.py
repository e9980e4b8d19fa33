"""Which dtype a CPU worker should run gemma-3-270m in: bf16 against fp32, side by side.

    .venv/bin/python bench/dtype.py [--batch 1,8] [--new-tokens 64] [--rounds 3]

Loads the converted weights twice (bfloat16 and float32) and alternates greedy batched
`generate` calls between them, so both see the same machine load. Prints tokens/s per dtype
and batch size, and the fp32 / bf16 ratio at each batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import load_model, prompts  # noqa: E402


def rate(model: Any, tokenizer: Any, batch: int, new_tokens: int) -> float:
    import torch

    inputs = tokenizer(prompts(batch), return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return batch * new_tokens / (time.perf_counter() - started)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch.split(",")]
    models = {"bfloat16": load_model(torch.bfloat16), "float32": load_model(torch.float32)}
    for model, tokenizer in models.values():
        rate(model, tokenizer, 1, 4)  # warm-up
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for batch in sizes:
            for name, (model, tokenizer) in models.items():
                measured = rate(model, tokenizer, batch, args.new_tokens)
                best[name, batch] = max(best.get((name, batch), 0.0), measured)
    print(f"\n{'batch':>5} {'bf16 tok/s':>11} {'fp32 tok/s':>11} {'fp32/bf16':>10}")
    for batch in sizes:
        bf16, fp32 = best["bfloat16", batch], best["float32", batch]
        print(f"{batch:>5} {bf16:>11.1f} {fp32:>11.1f} {fp32 / bf16:>10.2f}")
    print(f"\nbest of {args.rounds} rounds, {args.new_tokens} new tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip


if __name__ == "__main__":
    main()

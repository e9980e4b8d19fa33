"""Long prompts among short ones: gemmaq's continuous decoder (paged KV cache, ragged and chunked
prefill) on gemma-3-270m, in this process, in the worker's CPU dtype.

    .venv/bin/python bench/longctx.py [--short 70] [--long 2000] [--new-tokens 64]

Short prompts are `--short` tokens, long ones `--long`; 8 slots. In one run:
- step times: one decoding step of 8 short rows, of 8 long rows, and of 7 short + 1 long (the
  median of 12 steps each, every row past its prefill, the three batches stepping in turn).
  `step_vs_ideal` is the mixed step over what a per-row cache costs: 8 short + (8 long - 8 short) / 8.
- a join: 7 short + 1 long join an empty batch together; the wall time until all 8 have their
  first token, over the sum of the same 8 prefills each alone (`join_waste`).
- a stall: 7 short rows decode; a long prompt joins. The longest gap between two tokens of the
  running rows while it prefills, over their median step with no join (`stall_steps`).
- end to end: 14 short + 2 long prompts, `--new-tokens` each, greedy, through gemmaq's decoder
  and through transformers' continuous batching manager (bench/mixed.py's `run_own` and
  `run_transformers_cb`); `vs_transformers_cb` is the ratio of their tokens/s.

The last line is the headline, in this exact form:
    longctx: vs_transformers_cb=R1 join_waste=R2 stall_steps=N step_vs_ideal=R3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mixed import BATCH, never_cancelled, run_own, run_transformers_cb  # noqa: E402
from bench.throughput import load_model  # noqa: E402

TEXT = (
    "The harbour town woke slowly. Fishing boats came in with the tide, gulls argued over the "
    "nets, and the baker on the corner opened his shutters to the smell of bread. "
)


def prompt(tokenizer: Any, tokens: int, topic: int) -> str:
    """A text of about `tokens` tokens (with the BOS the tokenizer adds)."""
    body = f"Story {topic}. " + TEXT * (tokens // 20 + 2)
    ids = tokenizer(body, add_special_tokens=False)["input_ids"][: tokens - 1]
    return str(tokenizer.decode(ids))


def decoder_for(model: Any, tokenizer: Any) -> Any:
    from workers.engine.continuous import ContinuousDecoder
    from workers.engine.generation import Decoder

    return ContinuousDecoder(Decoder(model=model, tokenizer=tokenizer, device=model.device), max_rows=BATCH)


def request(i: int, text: str, new_tokens: int) -> Any:
    from core.schemas import GenerationParams
    from workers.shared.base import Request

    return Request(
        job_id=f"r{i}", messages=None, prompt=text, params=GenerationParams(max_new_tokens=new_tokens)
    )


def join(stream: Any, tokenizer: Any, texts: Sequence[str], first: int = 0, new_tokens: int = 10_000) -> None:
    entries = [
        (first + i, request(first + i, t, new_tokens), tokenizer(t)["input_ids"]) for i, t in enumerate(texts)
    ]
    assert not stream.join(entries)


def prefilled(stream: Any) -> bool:
    return all(r.computed >= r.length - 1 and r.tokens for r in stream.rows)


def step_times(model: Any, tokenizer: Any, batches: Sequence[Sequence[str]], steps: int = 12) -> list[float]:
    """The median time of a decoding step of each batch once every row is past its prefill: the
    batches step in turn (one step each, round after round), so that the machine's drift falls
    on all of them alike."""
    streams = []
    for texts in batches:
        stream = decoder_for(model, tokenizer)
        join(stream, tokenizer, texts)
        while not prefilled(stream):
            stream.step(never_cancelled)
        streams.append(stream)
    times: list[list[float]] = [[] for _ in streams]
    for _ in range(steps):
        for stream, own in zip(streams, times, strict=True):
            started = time.perf_counter()
            stream.step(never_cancelled)
            own.append(time.perf_counter() - started)
    for stream in streams:
        stream.abandon()
    return [statistics.median(own) for own in times]


def first_tokens(model: Any, tokenizer: Any, texts: Sequence[str]) -> float:
    """Seconds from a join of `texts` into an empty batch until every row has its first token."""
    stream = decoder_for(model, tokenizer)
    started = time.perf_counter()
    join(stream, tokenizer, texts)
    while not all(r.tokens for r in stream.rows):
        stream.step(never_cancelled)
    seconds = time.perf_counter() - started
    stream.abandon()
    return seconds


def stall(model: Any, tokenizer: Any, short: Sequence[str], long: str) -> tuple[float, float, int]:
    """(the running rows' median step with no join, their longest gap while `long` joins, the
    steps the join took)."""
    stream = decoder_for(model, tokenizer)
    join(stream, tokenizer, short)
    while not prefilled(stream):
        stream.step(never_cancelled)
    quiet = []
    for _ in range(8):
        started = time.perf_counter()
        stream.step(never_cancelled)
        quiet.append(time.perf_counter() - started)
    join(stream, tokenizer, [long], first=len(short))
    newcomer = stream.rows[-1]
    running = stream.rows[: len(short)]
    gaps, steps = [], 0
    last = time.perf_counter()
    while not newcomer.tokens:
        counts = [len(r.tokens) for r in running]
        stream.step(never_cancelled)
        now = time.perf_counter()
        assert all(len(r.tokens) == n + 1 for r, n in zip(running, counts, strict=True))
        gaps.append(now - last)
        last, steps = now, steps + 1
    stream.abandon()
    return statistics.median(quiet), max(gaps), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=70)
    parser.add_argument("--long", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer = load_model()
    short = [prompt(tokenizer, args.short, i) for i in range(14)]
    long = [prompt(tokenizer, args.long, 100 + i) for i in range(8)]
    print(
        f"prompts: short {len(tokenizer(short[0])['input_ids'])} tokens, "
        f"long {len(tokenizer(long[0])['input_ids'])}"
    )
    first_tokens(model, tokenizer, short[:2])  # warm-up

    s8, l8, mixed = step_times(model, tokenizer, [short[:8], long[:8], [*short[:7], long[0]]])
    ideal = s8 + (l8 - s8) / 8
    print(f"decode step: 8 short {s8 * 1000:.1f} ms, 8 long {l8 * 1000:.1f} ms, 7 short + 1 long "
          f"{mixed * 1000:.1f} ms (per-row ideal {ideal * 1000:.1f} ms)")  # fmt: skip

    together = first_tokens(model, tokenizer, [*short[:7], long[0]])
    alone = sum(first_tokens(model, tokenizer, [t]) for t in [*short[:7], long[0]])
    print(
        f"join of 7 short + 1 long: {together:.2f} s to every first token; the 8 prefills alone {alone:.2f} s"
    )

    quiet, gap, steps = stall(model, tokenizer, short[:7], long[1])
    print(f"7 running rows, median step {quiet * 1000:.1f} ms; while a {args.long}-token prompt joined "
          f"({steps} steps) their longest gap was {gap * 1000:.1f} ms")  # fmt: skip

    texts = [*short, long[2], long[3]]
    texts = [
        texts[i] for i in (0, 1, 2, 14, 3, 4, 5, 6, 7, 8, 9, 15, 10, 11, 12, 13)
    ]  # the long ones among them
    limits = [args.new_tokens] * len(texts)
    own = run_own(model, tokenizer, texts, limits)
    del model
    hf = run_transformers_cb(load_model(stock=True)[0], tokenizer, texts, limits)
    own_rate, hf_rate = own["tokens"] / own["seconds"], hf["tokens"] / hf["seconds"]
    print(f"14 short + 2 long, {args.new_tokens} new tokens each: gemmaq {own['tokens']} tokens in "
          f"{own['seconds']:.2f} s = {own_rate:.1f} tok/s; transformers CB {hf['tokens']} in "
          f"{hf['seconds']:.2f} s "
          f"= {hf_rate:.1f} tok/s")  # fmt: skip
    print(
        f"longctx: vs_transformers_cb={own_rate / hf_rate:.2f} join_waste={together / alone:.2f} "
        f"stall_steps={gap / quiet:.1f} step_vs_ideal={mixed / ideal:.2f}"
    )


if __name__ == "__main__":
    main()

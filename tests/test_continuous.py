"""The continuous decoder on the real Gemma 3 270M weights (float32, so batched and alone agree exactly):
rows that join a running batch at different steps, leave it early, are cancelled or sample with seeds
get what they would get alone."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from core.schemas import GenerationParams
from tests.helpers.models import gemma_270m_float32
from workers.engine.continuous import ContinuousDecoder, Outcome, results_of
from workers.engine.generation import Decoder
from workers.shared.base import Request, Result

# The real 270M weights decoding in this process: minutes on a CPU, not a unit test's seconds.
pytestmark = pytest.mark.stack

PROMPTS = [
    "The capital city of Germany is Berlin. The capital city of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "A long list of animals that live in the forest, with a few words about each one:",
    "1, 2, 3,",
    "Hello",
]


@pytest.fixture(scope="module")
def decoder() -> Iterator[Decoder]:
    model, tokenizer = gemma_270m_float32()
    yield Decoder(model=model, tokenizer=tokenizer, device=torch.device("cpu"))


def request(i: int, **params: Any) -> Request:
    return Request(job_id=f"job{i}", messages=None, prompt=PROMPTS[i], params=GenerationParams(**params))


def ids(decoder: Decoder, r: Request) -> list[int]:
    assert r.prompt is not None
    return list(decoder.tokenizer(r.prompt)["input_ids"])


def alone(decoder: Decoder, r: Request) -> str:
    stream = ContinuousDecoder(decoder, max_rows=1)
    return run(stream, [r])[r.job_id].text


def never(job_ids: Sequence[str]) -> list[float | None]:
    return [None] * len(job_ids)


def run(
    stream: ContinuousDecoder, requests: Sequence[Request], *, join_every: int = 3
) -> dict[object, Result]:
    """Join the requests a few steps apart (as many as fit), step until all are done."""
    pending, results, steps = list(requests), dict[object, Result](), 0
    while pending or stream.rows:
        if pending and stream.free and steps % join_every == 0:
            joining, pending = pending[: stream.free], pending[stream.free :]
            results.update(results_of(stream.join([(r.job_id, r, ids(stream.decoder, r)) for r in joining])))
        if stream.rows:
            results.update(results_of(stream.step(never)))
        steps += 1
    return results


def test_rows_joining_and_leaving_get_what_they_get_alone(decoder: Decoder) -> None:
    lengths = [20, 40, 6, 30, 25, 12]
    requests = [request(i, max_new_tokens=n) for i, n in enumerate(lengths)]
    expected = {r.job_id: alone(decoder, r) for r in requests}
    # Three slots for six requests: rows join at different steps and refill freed slots.
    results = run(ContinuousDecoder(decoder, max_rows=3), requests, join_every=2)
    assert {j: r.text for j, r in results.items()} == expected
    for r in requests:
        result = results[r.job_id]
        assert result.output_tokens == r.params.max_new_tokens or result.finish_reason == "stop"
        assert result.input_tokens == len(ids(decoder, r))
    assert max(r.batch_size for r in results.values()) == 3
    # The same first row through HF's own generate: the decoder matches it token for token.
    first = requests[0]
    with torch.inference_mode():
        out = decoder.model.generate(
            torch.tensor([ids(decoder, first)]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=decoder.eos_ids,
        )
    assert decoder.decode(out[0, len(ids(decoder, first)) :].tolist()) == expected[first.job_id]


def test_stop_strings_and_a_cancel_end_only_their_own_row(decoder: Decoder) -> None:
    stop = request(4, max_new_tokens=40, stop=[" 6"])
    victim = request(1, max_new_tokens=200)
    mate = request(0, max_new_tokens=20)
    flags: dict[str, float] = {}
    stream = ContinuousDecoder(decoder, max_rows=4)
    results = dict(results_of(stream.join([(r.job_id, r, ids(decoder, r)) for r in (stop, victim, mate)])))
    for step in range(60):
        if step == 5:
            flags[victim.job_id] = 0.0  # requested before every step that follows
        results.update(results_of(stream.step(lambda job_ids: [flags.get(j) for j in job_ids])))
        if not stream.rows:
            break
    assert results[stop.job_id].finish_reason == "stop"
    assert results[stop.job_id].text.strip().endswith("5,") and " 6" not in results[stop.job_id].text
    assert results[victim.job_id].finish_reason == "cancelled"
    assert 4 <= results[victim.job_id].output_tokens <= 7
    assert results[mate.job_id].text == alone(decoder, mate)


def test_seeded_sampling_does_not_depend_on_batch_mates(decoder: Decoder) -> None:
    sampled = request(1, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    first = alone(decoder, sampled)
    mates = [request(i, max_new_tokens=10 + i) for i in (0, 2, 3)]
    results = run(ContinuousDecoder(decoder, max_rows=4), [*mates, sampled], join_every=1)
    assert results[sampled.job_id].text == first
    other_seed = request(1, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=99)
    assert alone(decoder, other_seed) != first


def test_requests_that_reach_freed_slots_a_moment_apart_join_as_one(decoder: Decoder) -> None:
    """Rows end; the jobs that take their slots reach the engine a few milliseconds apart. They
    join the running batch together (one prefill), not one by one; a request on its own still
    joins once `max_wait_ms` has passed."""
    from workers.engine.batcher import Batcher
    from workers.engine.device import LockedRunner
    from workers.engine.text import TextEngine

    joins: list[int] = []

    class Counted(ContinuousDecoder):
        def join(self, entries: Sequence[tuple[object, Request, list[int]]]) -> list[Outcome]:
            joins.append(len(entries))
            return super().join(entries)

    class Engine(TextEngine):
        def stream(self) -> ContinuousDecoder:
            return Counted(self.decoder, max_rows=self.max_batch_size)

    engine = Engine(name="t", model=decoder.model, tokenizer=decoder.tokenizer, device="cpu",
                    max_batch_size=4, max_input_tokens=4096)  # fmt: skip
    flags: dict[str, float] = {}
    batcher = Batcher(engine, batching="continuous", max_batch_size=4, max_wait_ms=1000,
                      device=LockedRunner(), cancelled=lambda ids: [flags.get(j) for j in ids])  # fmt: skip
    try:
        long = request(3, max_new_tokens=2000)  # runs until it is cancelled below
        first = [batcher.submit(long), *(batcher.submit(request(i, max_new_tokens=4)) for i in (0, 1, 2))]
        for future in first[1:]:
            future.result(timeout=60)
        assert joins == [4]
        later = [request(i, max_new_tokens=6) for i in (4, 5, 0)]
        futures = []
        for r in later:  # three slots free: the three newcomers arrive 0.1 s apart
            futures.append(batcher.submit(r))
            time.sleep(0.1)
        results = [f.result(timeout=60) for f in futures]
        assert joins == [4, 3]
        assert [r.text for r in results] == [alone(decoder, r) for r in later]
        lone = batcher.submit(request(5, max_new_tokens=3))  # fewer than the free slots, for good
        started = time.monotonic()
        lone.result(timeout=60)
        assert joins == [4, 3, 1] and time.monotonic() - started >= 0.9
        assert not first[0].done()
        flags[long.job_id] = 0.0
        assert first[0].result(timeout=60).finish_reason == "cancelled"
    finally:
        batcher.stop()


def test_a_request_sent_again_goes_on_from_the_tokens_it_had(decoder: Decoder) -> None:
    """After an engine death the shell sends a request again with the tokens its deltas had
    reported: the decoder prefills them with the prompt and goes on, so the text starts with what
    was already streamed, and the token count is the whole reply's."""
    first = request(3, max_new_tokens=24)
    full = run(ContinuousDecoder(decoder, max_rows=1), [first])[first.job_id]
    tokens = list(decoder.tokenizer(full.text, add_special_tokens=False)["input_ids"])
    again = request(3, max_new_tokens=24)
    again.resume_tokens = tokens[:10]
    mates = [request(0, max_new_tokens=6), request(2, max_new_tokens=12)]
    results = run(ContinuousDecoder(decoder, max_rows=3), [*mates, again], join_every=1)
    resumed = results[again.job_id]
    assert resumed.text.startswith(decoder.decode(tokens[:10]))
    assert resumed.text == full.text and resumed.output_tokens == full.output_tokens == 24
    assert resumed.input_tokens == full.input_tokens

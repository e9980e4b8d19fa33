"""The continuous decoder's paged KV cache on the real Gemma 3 270M weights (float32, so that a row
gives the same greedy text in any batch): memory that is budgeted, sliding layers that hold their
window, a failing row that fails alone, a preempted row that goes on as if it had not been, and a
Gemma 3, a Gemma 3n and a Gemma 4 multimodal checkpoint's text jobs in the same continuous batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from core.schemas import GenerationParams
from tests.helpers.models import gemma_270m_float32
from workers.engine import kv
from workers.engine.continuous import ContinuousDecoder
from workers.engine.text import TextEngine
from workers.shared.base import Request, RequestError, Result

pytestmark = pytest.mark.stack  # real weights decoding in this process: minutes on a CPU

STORY = (
    "The harbour town woke slowly. Fishing boats came in with the tide, gulls argued over the nets, and "
    "the baker on the corner opened his shutters to the smell of bread. "
)


@pytest.fixture(scope="module")
def engine() -> Iterator[TextEngine]:
    model, tokenizer = gemma_270m_float32()
    yield TextEngine(name="t", model=model, tokenizer=tokenizer, device="cpu", max_batch_size=12,
                     max_input_tokens=8192)  # fmt: skip


def never(job_ids: Sequence[str]) -> list[float | None]:
    return [None] * len(job_ids)


def long_prompt(engine: TextEngine, tokens: int, topic: int) -> str:
    ids = engine.tokenizer(f"Chapter {topic}, about {topic * 7} ships. " + STORY * (tokens // 25 + 2),
                           add_special_tokens=False)["input_ids"]  # fmt: skip
    return str(engine.tokenizer.decode(ids[: tokens - 1]))


def request(job: str, prompt: str, **params: Any) -> Request:
    return Request(job_id=job, messages=None, prompt=prompt, params=GenerationParams(**params))


def drive(stream: ContinuousDecoder, engine: TextEngine, requests: Sequence[Request]) -> dict[object, Any]:
    """Join every request at once, step until all are done."""
    outcomes: dict[object, Any] = dict(stream.join([(r.job_id, r, engine.encode(r)) for r in requests]))
    while stream.rows:
        outcomes.update(stream.step(never))
    return outcomes


def alone(engine: TextEngine, r: Request) -> str:
    fresh = Request(job_id=r.job_id, messages=None, prompt=r.prompt, params=r.params)
    result = drive(ContinuousDecoder(engine.decoder, max_rows=1), engine, [fresh])[r.job_id]
    assert isinstance(result, Result), result
    return result.text


def pool_for(engine: TextEngine, *, full_blocks: int, max_rows: int, block: int = 32) -> kv.KVPool:
    geometry = kv.Geometry.of(kv.text_config(engine.decoder.model))
    budget = kv.budget_bytes(geometry, full_blocks=full_blocks, block=block, max_rows=max_rows, chunk=128,
                             dtype=torch.float32)  # fmt: skip
    pool = kv.KVPool(geometry, budget_bytes=budget, block=block, max_rows=max_rows, chunk=128,
                     dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    assert pool.bytes <= budget and pool.blocks[kv.FULL] == full_blocks
    return pool


def test_twelve_long_jobs_share_a_cache_that_holds_three(engine: TextEngine) -> None:
    """A budget that holds about 3 rows of 1,500 tokens; 12 such jobs sent at once through the
    batcher. All succeed with the text each gets alone, and the pool never lends more than it has."""
    from workers.engine.batcher import Batcher
    from workers.engine.device import LockedRunner

    block = 32
    per_row = -(-1510 // block) + 1  # blocks of one row at its longest
    pool = pool_for(engine, full_blocks=int(per_row * 3.3) + 1, max_rows=12)
    engine.pool, engine.max_batch_size = pool, 12
    requests = [request(f"long{i}", long_prompt(engine, 1500, i), max_new_tokens=6) for i in range(12)]
    batcher = Batcher(engine, batching="continuous", max_batch_size=12, max_wait_ms=50, device=LockedRunner(),
                      cancelled=never)  # fmt: skip
    try:
        futures: list[Future[Result]] = [batcher.submit(r) for r in requests]
        results = [f.result(timeout=900) for f in futures]
    finally:
        batcher.stop()
    assert all(r.finish_reason in ("length", "stop") for r in results)
    assert max(r.batch_size for r in results) <= 4  # memory, not the 12 slots, held them back
    assert pool.peak_used[kv.FULL] <= pool.blocks[kv.FULL] - 1
    assert pool.used(kv.FULL) == pool.used(kv.SLIDING) == 0  # every block back
    for r, result in zip(requests, results, strict=True):
        assert result.input_tokens == len(engine.encode(r))
    assert [r.text for r in results[:3]] == [alone(engine, r) for r in requests[:3]]
    assert [r.text for r in results[-2:]] == [alone(engine, r) for r in requests[-2:]]


def test_a_prompt_the_cache_can_never_hold_is_refused_naming_the_limit(engine: TextEngine) -> None:
    stream = ContinuousDecoder(engine.decoder, max_rows=2, pool=pool_for(engine, full_blocks=8, max_rows=2))
    r = request("big", long_prompt(engine, 400, 1), max_new_tokens=4)
    [(key, outcome)] = stream.join([(r.job_id, r, engine.encode(r))])
    assert key == "big" and isinstance(outcome, RequestError)
    assert "at most 223 tokens" in str(outcome) and not stream.rows


def test_sliding_layers_hold_their_window_and_a_block(engine: TextEngine) -> None:
    stream = ContinuousDecoder(engine.decoder, max_rows=1)
    r = request("w", long_prompt(engine, 4000, 2), max_new_tokens=3)
    stream.join([(r.job_id, r, engine.encode(r))])
    window, block = stream.pool.geometry.window, stream.pool.block
    assert window == 512
    while stream.rows:
        row = stream.rows[0]
        stream.step(never)
        if row.tables is not None and row.computed > window:
            assert row.tables.held(kv.SLIDING) * block <= window + block
            assert row.tables.held(kv.FULL) * block >= row.computed  # the full layers keep it all
    assert row.computed >= 4000 and len(row.tokens) == 3


def test_a_row_whose_step_fails_fails_alone(engine: TextEngine) -> None:
    """A step raises whenever one job's row is in it: the decoder runs the step again in halves,
    that job fails, the others finish with their own text."""

    class Faulty(ContinuousDecoder):
        def _forward(self, spans: list[tuple[Any, int]]) -> dict[int, torch.Tensor | Exception | None]:
            if any(row.request.job_id == "poison" for row, _ in spans):
                raise RuntimeError("injected: this row's step fails")
            return super()._forward(spans)

    prompts = ["Once upon a time", "def fibonacci(n):", "1, 2, 3,", "The capital city of France is"]
    requests = [request(f"ok{i}", p, max_new_tokens=12) for i, p in enumerate(prompts)]
    poison = request("poison", "A poisoned prompt", max_new_tokens=12)
    outcomes = drive(
        Faulty(engine.decoder, max_rows=5), engine, [requests[0], requests[1], poison, *requests[2:]]
    )
    assert isinstance(outcomes["poison"], RuntimeError)
    assert [outcomes[r.job_id].text for r in requests] == [alone(engine, r) for r in requests]


def test_a_preempted_row_goes_on_as_if_it_had_not_been(engine: TextEngine) -> None:
    """A pool too small for three rows' replies: the newest row, held to a JSON grammar and sampled
    with a seed, is preempted and prefilled again later. Its text is what it is alone, and its
    stream of deltas shows no text twice."""
    block = 16
    seeded: dict[str, Any] = {
        "max_new_tokens": 40, "temperature": 0.8, "seed": 7, "response_format": {"type": "json_object"}
    }  # fmt: skip
    mates = [
        request(f"m{i}", p, max_new_tokens=40) for i, p in enumerate(["Once upon a time", "def add(a, b):"])
    ]
    target = request("json", "Describe a cat as JSON with keys name and age:", **seeded)
    stream = ContinuousDecoder(
        engine.decoder, max_rows=3, pool=pool_for(engine, full_blocks=8, max_rows=3, block=block)
    )
    deltas: list[tuple[str, str]] = []
    outcomes: dict[object, Any] = dict(
        stream.join([(r.job_id, r, engine.encode(r)) for r in [*mates, target]])
    )
    row = stream.rows[-1]
    while stream.rows:
        outcomes.update(stream.step(never))
        deltas += stream.deltas
        stream.deltas = []
    assert row.preempted >= 1 and stream.preemptions >= 1
    result = outcomes["json"]
    assert isinstance(result, Result)
    again = request("json", target.prompt or "", **seeded)
    assert result.text == alone(engine, again)
    assert result.text.startswith("{")  # held to its grammar across the preemption
    assert "".join(text for job, text in deltas if job == "json") == result.text
    for mate in mates:
        assert outcomes[mate.job_id].text == alone(engine, mate)


@pytest.mark.parametrize("name", ["tiny-gemma-3-vision", "tiny-gemma-3n", "tiny-gemma-4"])
def test_a_text_job_on_a_multimodal_variant_joins_the_continuous_batch(name: str) -> None:
    """The tiny Gemma 3 vision, Gemma 3n and Gemma 4 models (real architectures and processors; the
    last two share keys and values across layers): text jobs decode in the continuous batch through the
    language model, each as it would alone; an image job still runs, in a static batch between
    steps."""
    from PIL import Image

    from core.settings import Settings
    from core.variants import load_variants
    from workers.engine.batcher import Batcher
    from workers.engine.device import LockedRunner
    from workers.engine.loading import load_engine

    registry = load_variants(None)
    variant = registry.get(name)
    assert variant is not None and variant.batching == "continuous"
    vision: Any = load_engine(variant, registry, device="cpu", cache_root=Settings().model_cache)
    texts = [request(f"t{i}", p, max_new_tokens=8) for i, p in enumerate(["Hello there", "Once upon a time"])]
    picture = Request(job_id="img", messages=[{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (64, 64), (200, 30, 30))},
        {"type": "text", "text": "What is this?"}]}], prompt=None, params=GenerationParams(max_new_tokens=4),
        images=1)  # fmt: skip
    assert [vision.continuous(r) for r in [*texts, picture]] == [True, True, False]
    single = []
    for r in texts:
        stream = vision.stream()
        single.append(drive(stream, vision, [Request(job_id=r.job_id, messages=None, prompt=r.prompt,
                                                     params=r.params)])[r.job_id].text)  # fmt: skip
    batcher = Batcher(vision, batching="continuous", max_batch_size=4, max_wait_ms=200, device=LockedRunner(),
                      cancelled=never)  # fmt: skip
    try:
        futures = [batcher.submit(r) for r in [*texts, picture]]
        results = [f.result(timeout=300) for f in futures]
    finally:
        batcher.stop()
    assert [r.text for r in results[:2]] == single
    assert [r.batch_size for r in results[:2]] == [2, 2]  # they decoded side by side
    assert results[2].output_tokens >= 1

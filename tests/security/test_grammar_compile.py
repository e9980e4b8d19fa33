"""Finding 6, in the engine: grammars a tenant sends, each one new, compiled between two steps
held up every row of the batch for the sum of their compiles. They now compile on a thread of
their own, beside the steps; their requests join once compiled. On the real Gemma 3 270M."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import llguidance
import pytest

from core.schemas import GenerationParams
from core.structured import ResponseFormat
from tests.helpers.models import gemma_270m_float32
from workers.engine.batcher import Batcher
from workers.engine.device import LockedRunner
from workers.engine.text import TextEngine
from workers.shared.base import Request

pytestmark = pytest.mark.stack

SCHEMAS = 7  # with the running row, a batch of 8


def _schema(tenant: int) -> ResponseFormat:
    """A schema of 500 properties, each a pattern or a bounded integer: tens of milliseconds to
    compile, and unique to `tenant` (nothing cached helps)."""
    properties = {
        f"t{tenant}_p{i}": {
            "anyOf": [
                {"type": "string", "pattern": f"^[a-z]{{2,{i % 30 + 3}}}$"},
                {"type": "integer", "minimum": i, "maximum": i * 13 + 7},
            ]
        }
        for i in range(500)
    }
    schema = {"type": "object", "properties": properties, "required": [f"t{tenant}_p0"]}
    return ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )


@pytest.fixture(scope="module")
def engine() -> Iterator[TextEngine]:
    model, tokenizer = gemma_270m_float32()
    engine = TextEngine(name="gemma-3-270m", model=model, tokenizer=tokenizer, device="cpu",
                        max_batch_size=8, max_input_tokens=4096)  # fmt: skip
    engine.grammars.tokenizer()  # built once per engine, before this test's rows run
    yield engine


def test_new_grammars_compile_beside_the_steps_not_between_them(
    engine: TextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[float] = []  # when each step of the running row began (its cancel check)
    compiles: list[tuple[str, float, float]] = []  # (thread, began, ended) of each compile
    matcher = llguidance.LLMatcher

    class Watched:  # llguidance's matcher, its compiles watched
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            began = time.monotonic()
            try:
                return matcher(*args, **kwargs)
            finally:
                compiles.append((threading.current_thread().name, began, time.monotonic()))

    for name in dir(matcher):  # its static methods (grammars from schemas, validation)
        if not name.startswith("_"):
            setattr(Watched, name, getattr(matcher, name))
    monkeypatch.setattr(llguidance, "LLMatcher", Watched)

    def cancelled(job_ids: Sequence[str]) -> list[float | None]:
        if "long" in job_ids:
            steps.append(time.monotonic())
        return [None] * len(job_ids)

    batcher = Batcher(engine, batching="continuous", max_batch_size=8, max_wait_ms=5,
                      device=LockedRunner(), cancelled=cancelled)  # fmt: skip
    try:
        long = batcher.submit(Request(job_id="long", messages=None, prompt="1, 2, 3, 4, 5, 6,",
                                      params=GenerationParams(max_new_tokens=160)))  # fmt: skip
        deadline = time.monotonic() + 60
        while len(steps) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        constrained = [
            batcher.submit(Request(job_id=f"schema-{n}", messages=None, prompt="Fill in the form:",
                                   params=GenerationParams(max_new_tokens=4, response_format=_schema(n))))
            for n in range(SCHEMAS)
        ]  # fmt: skip
        for future in constrained:
            future.result(timeout=120)
        assert long.result(timeout=120).output_tokens == 160
    finally:
        batcher.stop()
    assert len(compiles) == SCHEMAS
    # Not on the thread that runs the steps (the batcher's, here), but on the grammars' own.
    assert {name for name, _, _ in compiles} == {"grammars_0"}, compiles
    began, ended = min(b for _, b, _ in compiles), max(e for _, _, e in compiles)
    step = statistics.median(b - a for a, b in itertools.pairwise(steps[:5]))
    assert ended - began > 2 * step, (ended - began, step)  # the compiles are worth several steps
    # Meanwhile the running row went on: compiled between two steps, none would begin here.
    assert any(began < t < ended for t in steps), (began, ended, steps)

"""LoRA adapters per row of the continuous batch, on the real Gemma 3 270M in float32 (so that a
row's greedy text is the same in any batch): an adapter trained here with PEFT answers as PEFT's
own model does; rows of two adapters and of the base, joining at different steps, each get the
text they get alone; an adapter that does not fit the model fails its own rows only; the cache
keeps to its budget without dropping an adapter a row still uses."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from core.schemas import GenerationParams
from tests.helpers.adapters import ATTENTION_SHAPES_270M, TAUGHT_ANSWER, TAUGHT_PROMPT, Taught, random_adapter
from tests.helpers.models import gemma_270m_float32
from workers.engine.continuous import ContinuousDecoder
from workers.engine.text import TextEngine
from workers.shared.base import AdapterRef, Request, RequestError, Result

pytestmark = pytest.mark.stack  # real weights trained and decoding in this process

MIB = 1024 * 1024
SHAPES = ATTENTION_SHAPES_270M


def ref(folder: Path, scale: float = 2.0) -> AdapterRef:
    path = folder / "adapter_model.safetensors"
    return AdapterRef(id=folder.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), path=str(path),
                      scale=scale)  # fmt: skip


@pytest.fixture(scope="module")
def engine() -> Iterator[TextEngine]:
    model, tokenizer = gemma_270m_float32()
    engine = TextEngine(name="t", model=model, tokenizer=tokenizer, device="cpu", max_batch_size=8,
                        max_input_tokens=2048, adapter_cache_bytes=64 * MIB)  # fmt: skip
    yield engine
    assert engine.adapters is not None
    engine.adapters.close()


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> AdapterRef:
    folder = tmp_path_factory.mktemp("adapters") / "noisy"
    random_adapter(folder, layers=18, shapes=SHAPES, rank=8, seed=1)
    return ref(folder)


def request(job: str, prompt: str, adapter: AdapterRef | None = None, tokens: int = 12) -> Request:
    return Request(job_id=job, messages=None, prompt=prompt, params=GenerationParams(max_new_tokens=tokens),
                   adapter=adapter)  # fmt: skip


def never(job_ids: Sequence[str]) -> list[float | None]:
    return [None] * len(job_ids)


def run(engine: TextEngine, waves: dict[int, list[Request]], max_rows: int = 8) -> dict[object, Any]:
    """Requests joining one stream at the steps named (each once `ready`, as the batcher asks),
    stepped until every row is done: job id → Result or the error of its row."""
    stream = ContinuousDecoder(engine.decoder, max_rows=max_rows, pool=engine.pool, adapters=engine.adapters)
    outcomes: dict[object, Any] = {}
    step = 0
    while step <= max(waves) or stream.rows:
        joining = waves.get(step, [])
        for r in joining:
            deadline = time.monotonic() + 60
            while not engine.ready(r):
                assert time.monotonic() < deadline, r.job_id
                time.sleep(0.01)
        outcomes.update(stream.join([(r.job_id, r, engine.encode(r)) for r in joining]))
        if stream.rows:
            outcomes.update(stream.step(never))
        step += 1
    return outcomes


def text_of(outcome: Any) -> str:
    assert isinstance(outcome, Result), outcome
    return outcome.text


def alone(engine: TextEngine, r: Request) -> str:
    fresh = request(r.job_id, r.prompt or "", r.adapter, r.params.max_new_tokens)
    return text_of(run(engine, {0: [fresh]}, max_rows=1)[r.job_id])


def test_an_adapter_trained_with_peft_answers_as_peft_does_and_the_base_does_not(
    engine: TextEngine, taught: Taught
) -> None:
    adapter, peft_text = ref(taught.folder), taught.peft_text
    assert taught.seconds < 60, taught.seconds
    assert peft_text == TAUGHT_ANSWER, peft_text
    got = run(engine, {0: [request("with", TAUGHT_PROMPT, adapter), request("base", TAUGHT_PROMPT)]})
    assert text_of(got["with"]) == peft_text
    assert "marigold" not in text_of(got["base"])


def test_rows_of_two_adapters_and_the_base_joining_at_different_steps_get_their_text_alone(
    engine: TextEngine, taught: Taught, noisy: AdapterRef
) -> None:
    adapter = ref(taught.folder)
    prompts = ["The river runs through", "My favourite recipe is", TAUGHT_PROMPT, "In 1850 the town"]
    waves = {
        0: [request("a0", prompts[0], adapter), request("b0", prompts[1])],
        2: [request("n0", prompts[2], noisy), request("a1", prompts[2], adapter)],
        5: [request("b1", prompts[3]), request("n1", prompts[0], noisy, tokens=20)],
        9: [request("a2", prompts[1], adapter), request("n2", prompts[3], noisy)],
    }
    got = run(engine, waves)
    everyone = [r for wave in waves.values() for r in wave]
    assert len(got) == len(everyone)
    for r in everyone:
        assert text_of(got[r.job_id]) == alone(engine, r), r.job_id
    # The adapters changed what their rows say: the same prompt, three texts.
    same_prompt = {text_of(got[j]) for j in ("n0", "a1")} | {alone(engine, request("x", prompts[2]))}
    assert len(same_prompt) == 3


def test_an_adapter_that_does_not_fit_the_model_fails_its_own_rows_only(
    engine: TextEngine, tmp_path: Path, noisy: AdapterRef
) -> None:
    wrong = tmp_path / "wrong"  # shaped for a wider model (1152 wide, Gemma 3 1B)
    random_adapter(wrong, layers=2, shapes={"q_proj": (1152, 1024)}, rank=8, seed=2)
    missing = AdapterRef(id="gone", sha256="0" * 64, path=str(tmp_path / "gone.safetensors"), scale=1.0)
    got = run(engine, {0: [request("wrong", "Hello", ref(wrong)), request("gone", "Hello", missing),
                           request("ok", "Hello", noisy), request("base", "Hello")]})  # fmt: skip
    assert isinstance(got["wrong"], RequestError) and "does not fit" in str(got["wrong"])
    assert isinstance(got["gone"], RequestError) and "could not be read" in str(got["gone"])
    assert text_of(got["ok"]) == alone(engine, request("ok", "Hello", noisy))
    assert text_of(got["base"]) == alone(engine, request("base", "Hello"))


def test_the_cache_keeps_to_its_budget_and_never_drops_an_adapter_in_use(
    engine: TextEngine, tmp_path: Path, noisy: AdapterRef
) -> None:
    adapters = engine.adapters
    assert adapters is not None
    folders = []
    for i in range(3):
        folders.append(tmp_path / f"r{i}")
        random_adapter(folders[-1], layers=18, shapes=SHAPES, rank=8, seed=10 + i)
    one = 18 * sum(8 * (n_in + n_out) for n_in, n_out in SHAPES.values()) * 4  # float32 bytes
    saved, adapters.budget_bytes = adapters.budget_bytes, 2 * one + one // 2
    try:
        for old in list(adapters.loaded):
            adapters._drop(old)
        evictions = adapters.evictions
        # Three adapters in one batch: over the budget while all three are in use.
        got = run(engine, {0: [request(f"r{i}", "Once upon a time", ref(f)) for i, f in enumerate(folders)]})
        assert all(isinstance(o, Result) for o in got.values()), got
        assert adapters.evictions == evictions and len(adapters.loaded) == 3
        # Then one more, alone: the least recently used ones go until it fits.
        run(engine, {0: [request("n", "Once upon a time", noisy)]})
        assert adapters.used() <= adapters.budget_bytes
        assert list(adapters.loaded)[-1] == noisy.id and "r0" not in adapters.loaded
        assert adapters.report()["evictions"] == adapters.evictions > evictions
    finally:
        adapters.budget_bytes = saved

"""The warm variant cache on its own: real batchers and a real loader thread, tiny fake engines.

The end-to-end behaviour (real workers, real weights) is in tests/test_variant_cache.py.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future

import pytest
import torch

from core.schemas import GenerationParams
from core.variants import Variant, parse_variants
from workers.engine.cache import VariantCache
from workers.engine.device import LockedRunner
from workers.shared.base import CancelCheck, Request, RequestError, Result, ShuttingDown

pytestmark = pytest.mark.unit

MB = 2**20


class FakeEngine:
    """Answers every request with its variant's name; holds an (untouched) buffer of `mb` MiB,
    as a model holds its weights."""

    def __init__(self, name: str, gate: threading.Event, mb: int) -> None:
        self.name = name
        self.device = "cpu"
        self.max_batch_size = 4
        self.gate = gate
        self.model = torch.nn.Module()
        self.model.register_buffer("weights", torch.empty(mb * MB, dtype=torch.uint8))

    def warmup(self) -> None:
        return None

    def generate(self, batch: Sequence[Request], cancelled: CancelCheck) -> list[Result | Exception]:
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return [Result(self.name, "stop", 1, 1, None, 1.0, len(batch)) for _ in batch]


class Harness:
    def __init__(self, budget_mb: int, sizes: dict[str, int], actual: dict[str, int]) -> None:
        body = {n: {"family": "t", "size": "0", "tasks": ["text"], "source": "echo", "engine": "echo",
                    "memory_mb": mb} for n, mb in sizes.items()}  # fmt: skip
        self.gates = {name: threading.Event() for name in sizes}
        for gate in self.gates.values():
            gate.set()
        self.actual = sizes | actual  # what the engines really hold; the registry declares `sizes`
        self.loads: list[str] = []
        self.engines: list[weakref.ref[FakeEngine]] = []
        self.cache = VariantCache(
            parse_variants({"variants": body}),
            device="cpu",
            budget_bytes=budget_mb * MB,
            runner=LockedRunner(),
            cancelled=lambda ids: [None] * len(ids),
            load=self._load,
        )

    def _load(self, variant: Variant) -> FakeEngine:
        self.loads.append(variant.name)
        engine = FakeEngine(variant.name, self.gates[variant.name], self.actual[variant.name])
        self.engines.append(weakref.ref(engine))
        return engine

    def submit(self, name: str) -> Future[Result]:
        request = Request(job_id=name, messages=None, prompt="x", params=GenerationParams())
        return self.cache.submit(name, request)

    def run(self, name: str) -> Result:
        return self.submit(name).result(timeout=10)

    def states(self) -> dict[str, str]:
        return {name: report["state"] for name, report in self.cache.report().items()}


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness(*request.param)
    yield h
    for gate in h.gates.values():
        gate.set()
    h.cache.close()


def cache_of(budget_mb: int, actual: dict[str, int] | None = None, **sizes: int) -> pytest.MarkDecorator:
    """A cache with this budget over variants declaring these sizes (MiB); `actual`: what some
    of them really hold when loaded, when it differs."""
    return pytest.mark.parametrize("harness", [(budget_mb, sizes, actual or {})], indirect=True)


@cache_of(300, actual={"a": 1}, a=100, b=100)
def test_cold_variant_loads_on_demand_beside_the_warm_one(harness: Harness) -> None:
    harness.cache.start(["a", "b"], preload=["a"])
    assert harness.states() == {"a": "warm", "b": "cold"}
    first = harness.run("a")
    assert first.text == "a" and first.load_ms is not None
    assert harness.run("b").text == "b"
    again = harness.run("a")
    assert again.load_ms is None  # still the first load's engine
    assert harness.loads == ["a", "b"] and harness.states() == {"a": "warm", "b": "warm"}
    report = harness.cache.report()["a"]
    # Measured (1 MiB of parameters) replaces the declared 100 MB once loaded.
    assert report["resident_mb"] == report["memory_mb"] == 1.0
    assert report["last_used_at"] is not None and report["load_ms"] is not None


@cache_of(250, a=100, b=100, c=100)
def test_least_recently_used_idle_variant_is_evicted_and_freed(harness: Harness) -> None:
    harness.cache.start(["a", "b", "c"])
    assert harness.states() == {"a": "warm", "b": "warm", "c": "cold"}  # two fit
    for name in ("a", "b", "a", "c"):  # c evicts b, the least recently used
        assert harness.run(name).text == name
    assert harness.loads == ["a", "b", "c"]
    assert harness.states() == {"a": "warm", "b": "cold", "c": "warm"}
    assert harness.run("b").text == "b"  # now a is the least recently used
    assert harness.states() == {"a": "cold", "b": "warm", "c": "warm"}
    gc.collect()
    alive = [ref().name for ref in harness.engines if ref() is not None]  # type: ignore[union-attr]
    assert sorted(alive) == ["b", "c"], "an evicted variant's engine must be freed"


@cache_of(150, a=100, b=100)
def test_busy_variant_is_evicted_only_after_its_batch(harness: Harness) -> None:
    harness.cache.start(["a", "b"])
    harness.gates["a"].clear()
    running = harness.submit("a")
    waiting = harness.submit("b")
    time.sleep(0.5)
    assert harness.states() == {"a": "warm", "b": "cold"} and not waiting.done()
    harness.gates["a"].set()
    assert running.result(timeout=10).text == "a"
    result = waiting.result(timeout=10)
    assert result.text == "b" and result.load_ms is not None
    assert harness.states() == {"a": "cold", "b": "warm"}
    assert harness.run("a").text == "a"  # evicted, then loaded again on demand
    assert harness.loads == ["a", "b", "a"]


@cache_of(150, a=100, b=100)
def test_request_waiting_for_a_load_gives_up_at_its_limit(harness: Harness) -> None:
    harness.cache.start(["a", "b"])
    harness.gates["a"].clear()
    running = harness.submit("a")
    waiting = harness.submit("b")
    with pytest.raises(TimeoutError):
        waiting.result(timeout=0.3)
    assert waiting.cancel()
    harness.gates["a"].set()
    running.result(timeout=10)
    time.sleep(1.5)  # the loader drops the abandoned request and loads nothing
    assert harness.loads == ["a"] and harness.states() == {"a": "warm", "b": "cold"}


@cache_of(150, a=100, big=200)
def test_variant_bigger_than_the_budget_is_unavailable(harness: Harness) -> None:
    harness.cache.start(["a", "big"])
    report = harness.cache.report()["big"]
    assert report["state"] == "unavailable" and "memory budget of 150 MB" in report["reason"]
    with pytest.raises(RequestError, match="variant unavailable"):
        harness.run("big")


@cache_of(150, a=100, b=100)
def test_drain_sends_requests_waiting_for_a_load_back(harness: Harness) -> None:
    harness.cache.start(["a", "b"])
    harness.gates["a"].clear()
    running = harness.submit("a")
    waiting = harness.submit("b")
    time.sleep(0.2)
    harness.cache.drain()
    with pytest.raises(ShuttingDown):
        waiting.result(timeout=5)
    harness.gates["a"].set()
    assert running.result(timeout=10).text == "a"  # the batch in hand finishes
    assert harness.loads == ["a"]

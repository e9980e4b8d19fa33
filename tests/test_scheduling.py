"""Which queued job a worker takes next: priority first, then fair share between users."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from core.scheduling import BROKER_STEPS, broker_step
from tests.helpers.jobs import submit, text_job
from tests.helpers.stack import Stack, wait_job


@pytest.mark.unit
def test_priority_bands_come_first_then_few_jobs_in_flight() -> None:
    assert broker_step(9, 1000) < broker_step(8, 1)  # any urgent job before any less urgent one
    assert broker_step(5, 1) < broker_step(5, 3) < broker_step(5, 9) < broker_step(5, 33)
    assert broker_step(5, 1) == broker_step(5, 2)
    steps = {broker_step(p, n) for p in range(10) for n in (1, 5, 20, 500)}
    assert steps == set(BROKER_STEPS) and min(steps) == 0
    assert broker_step(99, 1) == broker_step(9, 1) and broker_step(-3, 1) == broker_step(0, 1)


@pytest.mark.stack
def test_a_flood_does_not_starve_another_users_job(stack: Stack) -> None:
    """A queues 24 jobs, then one urgent job; B queues one job. A worker (one job at a time) then
    starts: A's urgent job runs first, B's within the first few — not after A's backlog."""
    with (
        stack.client(stack.new_key("flooder", max_concurrent_jobs=100)) as flooder,
        stack.client(stack.new_key("other")) as other,
    ):
        body = text_job("flood", variant="echo-fair")
        with ThreadPoolExecutor(8) as pool:
            flood = list(pool.map(lambda _: submit(flooder, body)["id"], range(24)))
        urgent = submit(flooder, {**text_job("urgent", variant="echo-fair"), "priority": 9})["id"]
        single = submit(other, text_job("single", variant="echo-fair"))["id"]
        name = f"fair-{stack.namespace}@test"
        stack.gemmaq(
            "worker", "--variants", "echo-fair", "--device", "cpu", "--name", name, log="worker-fair.log"
        )
        jobs = {j: wait_job(flooder, j) for j in [*flood, urgent]} | {single: wait_job(other, single)}
        assert all(job["status"] == "succeeded" for job in jobs.values())
        order = sorted(jobs, key=lambda j: jobs[j]["started_at"])
        # The worker holds two jobs at a time; the first flood jobs (A had 1-2 in flight) share B's step.
        assert order.index(urgent) < 2, order.index(urgent)
        assert order.index(single) < 5, order.index(single)

"""Which queued job a worker takes next: tenants share the device fairly, each tenant's priority
orders its own jobs, and only an operator raises one tenant's jobs above another's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from core.scheduling import BROKER_STEPS, broker_step, shared_priority
from tests.helpers.jobs import submit, text_job
from tests.helpers.stack import Stack, wait_job


@pytest.mark.unit
def test_shared_priority_first_then_few_jobs_in_flight_then_own_priority() -> None:
    # A priority an operator granted comes before any lower shared priority, flood or not.
    assert broker_step(9, 1000, shared=9) < broker_step(9, 1, shared=8)
    # A tenant's priority 9 under the default cap of 5 competes as a 5: its flood stays behind
    # another tenant's single job of priority 5, and its own urgent job goes first among its own.
    capped = shared_priority(9, 5)
    assert capped == 5
    assert broker_step(5, 1, shared=5) < broker_step(9, 3, shared=capped) < broker_step(5, 3, shared=5)
    assert broker_step(5, 1) < broker_step(5, 3) < broker_step(5, 9) < broker_step(5, 33)
    assert broker_step(5, 1) == broker_step(5, 2)
    # A tenant may lower its own jobs below everyone's.
    assert broker_step(0, 1, shared=shared_priority(0, 5)) > broker_step(5, 1000, shared=5)
    steps = {broker_step(p, n, s) for p in range(10) for n in (1, 5, 20, 500) for s in range(10)}
    assert steps == set(BROKER_STEPS) and min(steps) == 0
    assert broker_step(99, 1) == broker_step(9, 1) and broker_step(-3, 1) == broker_step(0, 1)
    assert shared_priority(9, 12) == 9 and shared_priority(-1, 5) == 0


def run_in_order(stack: Stack, jobs: dict[str, httpx.Client]) -> list[str]:
    """Start a worker for echo-fair (one job at a time), wait for `jobs`: their ids by start."""
    name = f"fair-{stack.namespace}-{len(jobs)}@test"
    proc = stack.gemmaq(
        "worker", "--variants", "echo-fair", "--device", "cpu", "--name", name, log=f"worker-{name}.log"
    )
    try:
        done: dict[str, Any] = {j: wait_job(client, j) for j, client in jobs.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        stack.processes.remove(proc)
    assert all(job["status"] == "succeeded" for job in done.values())
    return sorted(done, key=lambda j: done[j]["started_at"])


@pytest.mark.stack
def test_a_flood_at_priority_9_does_not_starve_another_users_job(stack: Stack) -> None:
    """A queues 24 jobs at priority 9; B queues one at the default. A's priority ranks A's jobs
    among others' only up to its cap (5): B's job runs within the first few, not after A's flood."""
    with (
        stack.client(stack.new_key("flooder", max_concurrent_jobs=100)) as flooder,
        stack.client(stack.new_key("other")) as other,
    ):
        body = {**text_job("flood", variant="echo-fair"), "priority": 9}
        with ThreadPoolExecutor(8) as pool:
            flood = list(pool.map(lambda _: submit(flooder, body)["id"], range(24)))
        single = submit(other, text_job("single", variant="echo-fair"))["id"]
        order = run_in_order(stack, {**dict.fromkeys(flood, flooder), single: other})
    # The flood's first jobs (A had 1-2 in flight) share B's fair-share step.
    assert order.index(single) < 5, order.index(single)


@pytest.mark.stack
def test_priority_still_orders_a_users_own_jobs(stack: Stack) -> None:
    """A queues 24 jobs at the default priority, then one at 9: A's urgent job runs before the
    A jobs admitted into its fair-share step or after it (all but A's first 8)."""
    with stack.client(stack.new_key("own", max_concurrent_jobs=100)) as client:
        body = text_job("backlog", variant="echo-fair")
        backlog = [submit(client, body)["id"] for _ in range(24)]
        urgent = submit(client, {**text_job("urgent", variant="echo-fair"), "priority": 9})["id"]
        order = run_in_order(stack, dict.fromkeys([*backlog, urgent], client))
    later = [order.index(j) for j in backlog[8:]]
    assert order.index(urgent) < min(later), (order.index(urgent), order)

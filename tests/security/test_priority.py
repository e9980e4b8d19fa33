"""Finding 5: a tenant's own priority decided its place among other tenants' jobs, so a flood at
priority 9 went ahead of everyone. Now a tenant's priority ranks its jobs among others' only up to
its quota's `max_priority` (5 unless an operator raises it), and still orders its own jobs. Jobs
really run here, one at a time, on a worker for echo-fair; their order is their start times."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.helpers.jobs import submit, text_job
from tests.helpers.stack import Stack, wait_job

pytestmark = pytest.mark.stack


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

"""Which queued job a worker takes next: tenants share the device fairly, each tenant's priority
orders its own jobs, and only an operator raises one tenant's jobs above another's. The broker's
steps, here; the order jobs really run in, across tenants and within one, is
tests/security/test_priority.py."""

from __future__ import annotations

import pytest

from core.scheduling import BROKER_STEPS, broker_step, shared_priority


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

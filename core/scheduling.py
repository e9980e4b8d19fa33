"""Which job a worker takes next: tenants share the device fairly; a tenant's priority orders its
own jobs, and ranks them among other tenants' only as high as the operator lets it.

Each variant has one broker queue, kept by kombu's Redis transport as one list per step; a
worker always takes from the lowest non-empty step, first in first out within a step. gemmaq
spreads its steps over three keys, most significant first:

- the job's *shared* priority: its `priority` (9 = most urgent, 0 = batch), capped by its
  owner's `max_priority` (the quota row; `GEMMAQ_QUOTA_MAX_PRIORITY`, 5, unless an operator
  grants more). Every tenant may lower its jobs; only the operator raises one tenant's above
  another's. A tenant sending `priority: 9` under a cap of 5 competes as a 5;
- within a shared priority, the owner's jobs in flight (queued + running, all variants, counted
  by the quota's concurrency slots when the job is admitted): a user with one or two jobs in
  flight gets the first step, a user with hundreds the last;
- within those, the job's own `priority`: a tenant's urgent job goes ahead of its jobs of lower
  priority that were admitted into the same fair-share step, and of all it admits later.

So a user who floods a variant with hundreds of jobs, at any priority, does not starve another
user's single job: the single job is taken as soon as a worker has room, ahead of the flood's
backlog. Workers hold few jobs beyond their batch slots (workers/app.py), so "as soon as a
worker has room" is within a step or a batch, not after the backlog. Temporal and Hatchet keep
priority and fairness apart the same way.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis

PRIORITIES = 10  # gemmaq priorities 0..9
DEFAULT_MAX_PRIORITY = 5  # the shared priority a tenant reaches unless an operator grants more
# Jobs in flight (this one included) up to which a user's job lands in each fair-share step.
FAIR_SHARE_LIMITS = (2, 8, 32)
FAIR_STEPS = len(FAIR_SHARE_LIMITS) + 1
STEPS_PER_SHARED = FAIR_STEPS * PRIORITIES
BROKER_STEPS = list(range(PRIORITIES * STEPS_PER_SHARED))


def fair_share_step(in_flight: int) -> int:
    """0 for a user with few jobs in flight, up to FAIR_STEPS - 1 for a flood."""
    steps = (i for i, limit in enumerate(FAIR_SHARE_LIMITS) if in_flight <= limit)
    return next(steps, len(FAIR_SHARE_LIMITS))


def _clamp(priority: int) -> int:
    return min(max(priority, 0), PRIORITIES - 1)


def shared_priority(priority: int, max_priority: int) -> int:
    """A job's priority among all tenants' jobs: its own, capped by its owner's `max_priority`."""
    return min(_clamp(priority), _clamp(max_priority))


def broker_step(priority: int, in_flight: int = 0, shared: int | None = None) -> int:
    """kombu's step for a job (lower is served first). `shared`: its priority among all tenants'
    (`shared_priority`; None: `priority` itself, uncapped)."""
    own = _clamp(priority)
    among = own if shared is None else _clamp(shared)
    return (
        (PRIORITIES - 1 - among) * STEPS_PER_SHARED
        + fair_share_step(in_flight) * PRIORITIES
        + (PRIORITIES - 1 - own)
    )


# kombu's Redis transport keeps a message's priority within 0..9 (`max_priority`) whatever
# `priority_steps` says; this channel lets it use every step above.
class FairShareChannel(kombu_redis.Channel):
    max_priority = BROKER_STEPS[-1]


class FairShareTransport(kombu_redis.Transport):
    """kombu's Redis transport with gemmaq's priority steps (Celery's `broker_transport`)."""

    Channel = FairShareChannel


class FairShareSentinelChannel(kombu_redis.SentinelChannel):
    max_priority = BROKER_STEPS[-1]


class FairShareSentinelTransport(kombu_redis.SentinelTransport):
    """The same, for a Redis found through its sentinels (core/redis_target.py)."""

    Channel = FairShareSentinelChannel


TRANSPORT = f"{__name__}:FairShareTransport"
SENTINEL_TRANSPORT = f"{__name__}:FairShareSentinelTransport"

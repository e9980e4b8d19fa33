"""Which job a worker takes next: priority first, then fair sharing between users.

Each variant has one broker queue, kept by kombu's Redis transport as one list per priority
step; a worker always takes from the lowest non-empty step, first in first out within a step.
gemmaq spreads its steps over two keys:

- the job's `priority` (9 = most urgent, interactive; 0 = least, batch) picks a band of steps,
  so any job of a higher priority is taken before every job of a lower one;
- within a band, the owner's jobs in flight (queued + running, all variants, counted by the
  quota's concurrency slots when the job is admitted) pick the step: a user with one or two
  jobs in flight gets the band's first step, a user with hundreds the last.

So a user who floods a variant with hundreds of jobs at one priority does not starve another
user's single job at that priority: the single job is taken as soon as a worker has room,
ahead of the flood's backlog. Workers hold few jobs beyond their batch slots (workers/app.py),
so "as soon as a worker has room" is within a step or a batch, not after the backlog.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis

PRIORITIES = 10  # gemmaq priorities 0..9
# Jobs in flight (this one included) up to which a user's job lands in each step of its band.
FAIR_SHARE_LIMITS = (2, 8, 32)
STEPS_PER_PRIORITY = len(FAIR_SHARE_LIMITS) + 1
BROKER_STEPS = list(range(PRIORITIES * STEPS_PER_PRIORITY))


def fair_share_step(in_flight: int) -> int:
    """0 for a user with few jobs in flight, up to STEPS_PER_PRIORITY - 1 for a flood."""
    steps = (i for i, limit in enumerate(FAIR_SHARE_LIMITS) if in_flight <= limit)
    return next(steps, len(FAIR_SHARE_LIMITS))


def broker_step(priority: int, in_flight: int = 0) -> int:
    """kombu's priority step for a job (lower is served first)."""
    band = PRIORITIES - 1 - min(max(priority, 0), PRIORITIES - 1)
    return band * STEPS_PER_PRIORITY + fair_share_step(in_flight)


# kombu's Redis transport keeps a message's priority within 0..9 (`max_priority`) whatever
# `priority_steps` says; this channel lets it use every step above.
class FairShareChannel(kombu_redis.Channel):
    max_priority = BROKER_STEPS[-1]


class FairShareTransport(kombu_redis.Transport):
    """kombu's Redis transport with gemmaq's priority steps (Celery's `broker_transport`)."""

    Channel = FairShareChannel


TRANSPORT = f"{__name__}:FairShareTransport"

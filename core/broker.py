"""Celery configuration shared by the API (producer) and workers (consumers).

Only JSON crosses the broker; every Redis key the broker writes carries the
namespace prefix, so several deployments (or test runs) can share one Redis.
"""

from __future__ import annotations

import base64
import contextlib
import time
from typing import Any, Protocol

import redis
from celery import Celery
from kombu import serialization
from kombu.utils import json as kombu_json
from kombu.utils.uuid import uuid
from redis import exceptions as redis_errors
from redis.asyncio import Redis as AsyncRedis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core import redis_target
from core.events import add_status
from core.keys import message_key, queue_keys, submitted_key, variant_queue
from core.scheduling import BROKER_STEPS, SENTINEL_TRANSPORT, TRANSPORT, broker_step
from core.settings import Settings

RUN_JOB_TASK = "gemmaq.run_job"  # the one task's name, shared by the API and the workers
PRIORITY_STEPS = BROKER_STEPS  # (priority, fair share) steps: core/scheduling.py
REDIS_CONNECT_TIMEOUT_S = 0.5
REDIS_TIMEOUT_S = 5.0
BROKER_CONNECT_TIMEOUT_S = 2.0
BROKER_HEALTH_CHECK_S = 5


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_url, sentinel_options = redis_target.kombu_broker(settings.broker_url)
    if sentinel_options:
        transport: str | None = SENTINEL_TRANSPORT
    else:  # redis:// gets the transport that keeps every step (others clamp priorities to 0..9)
        transport = TRANSPORT if broker_url.startswith("redis://") else None
    return {
        "broker_url": broker_url,
        "broker_transport": transport,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "global_keyprefix": f"{settings.namespace}:",
            "priority_steps": PRIORITY_STEPS,
            "sep": ":",
            "queue_order_strategy": "priority",
            # Without a socket timeout a publish or a restore waits forever on a connection whose
            # server went away without closing it (a failover): the reconciler's round and a
            # worker's consumer hung for minutes in bench/chaos.py --ha. A BRPOP (1 s on the
            # server) overdue by the health check interval is dropped and made again.
            "socket_timeout": REDIS_TIMEOUT_S,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
            "socket_keepalive": True,
            "health_check_interval": BROKER_HEALTH_CHECK_S,
            **sentinel_options,
        },
        "broker_connection_retry_on_startup": True,
        # A lost broker connection (a Redis failover) leaves running jobs running: their acks
        # reach the new master through the same transport, and gemmaq's leases and claims keep a
        # job from running twice. Celery 6 means to cancel them instead, by default.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_timeout": 3,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        # No task events unless something watches: Flower turns them on in the workers while it
        # runs (its --enable_events, on by default); otherwise they are a Redis publish per
        # task state for no reader.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "task_default_queue": f"{settings.namespace}.default",
    }


def make_celery(settings: Settings, name: str = "gemmaq") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.gemmaq_settings = settings
    app.conf.gemmaq_markers = redis_client(settings)
    return app


def redis_client(settings: Settings) -> redis.Redis:
    """A synchronous client that gives up fast (one immediate retry, for a connection gone stale
    when Redis restarted): callers answer 503 or retry on their own terms."""
    return redis_target.sync_client(
        settings.broker_url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
    )


# A marker outlives any sensible queue wait; the reconciler re-sends a job whose marker is gone.
MESSAGE_MARKER_TTL_S = 7 * 86_400


def marker_value() -> str:
    """A message marker holds when the message was sent (see `marker_age_s`)."""
    return f"{time.time():.3f}"


def marker_age_s(value: bytes | str | None) -> float | None:
    """Seconds since the marked message was sent; None without a marker (an unreadable one is old)."""
    if value is None:
        return None
    try:
        return time.time() - float(value)
    except ValueError:
        return float("inf")


def enqueue_job(
    app: Celery,
    *,
    job_id: str,
    variant: str,
    priority: int,
    in_flight: int = 0,
    shared: int | None = None,
    countdown: float | None = None,
) -> None:
    """Send the job id (nothing else) to its variant's queue, marked as sent.

    The broker step comes from the job's priority, its priority among all users' (`shared`) and
    its owner's jobs in flight (see core/scheduling.py; kombu's Redis transport serves step 0
    first). The marker goes first, so a worker's claim (which clears it) always comes after it;
    a send that fails takes the marker back, and a marker that cannot be written only means the
    reconciler sends the job once more (a duplicate message is skipped by the claim).
    `countdown`: the job runs no sooner than that many seconds from now (the worker that takes
    the message holds the job's lease meanwhile).
    """
    settings: Settings = app.conf.gemmaq_settings
    markers: redis.Redis = app.conf.gemmaq_markers
    marker = message_key(settings, job_id)
    with contextlib.suppress(redis.RedisError):
        markers.set(marker, marker_value(), ex=MESSAGE_MARKER_TTL_S)
    try:
        app.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=variant_queue(variant),
            priority=broker_step(priority, in_flight, shared),
            retry=False,
            countdown=countdown,
        )
    except Exception:
        with contextlib.suppress(redis.RedisError):
            markers.delete(marker)
        raise


class Admitted(Protocol):
    """A job as stored: what its message is sent again from."""

    @property
    def id(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def shared_priority(self) -> int | None: ...


def enqueue_again(app: Celery, job: Admitted, *, in_flight: int = 0, countdown: float | None = None) -> None:
    """`enqueue_job` for a job queued before (requeued, put back, or its message lost): at the
    priorities it was admitted with."""
    enqueue_job(
        app,
        job_id=job.id,
        variant=job.variant,
        priority=job.priority,
        in_flight=in_flight,
        shared=job.shared_priority,
        countdown=countdown,
    )


def task_message(
    app: Celery, *, job_id: str, variant: str, priority: int, in_flight: int = 0, shared: int | None = None
) -> tuple[str, str]:
    """The Redis list and the message that `enqueue_job`'s `send_task` pushes for this job: Celery's
    task protocol 2 (built by Celery) in the kombu Redis transport's envelope (JSON, the body
    base64), for a producer that sends on an asyncio Redis client (`send_job`).
    tests/test_worker.py checks it against what kombu sends."""
    settings: Settings = app.conf.gemmaq_settings
    step = broker_step(priority, in_flight, shared)  # kombu serves 0 first
    task_id = uuid()
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id, RUN_JOB_TASK, args=[job_id], reply_to=app.thread_oid, ignore_result=None
    )
    content_type, encoding, data = serialization.dumps(body, serializer="json")  # type: ignore[no-untyped-call]
    delivery = {"exchange": "", "routing_key": variant_queue(variant)}
    message = {
        "body": base64.b64encode(data.encode() if isinstance(data, str) else data).decode(),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": properties
        | {
            "delivery_mode": 2,
            "delivery_info": delivery,
            "priority": step,
            "body_encoding": "base64",
            "delivery_tag": uuid(),
        },
    }
    return queue_keys(settings, variant)[step], kombu_json.dumps(message)  # type: ignore[no-untyped-call]


async def send_job(
    redis: AsyncRedis,
    app: Celery,
    *,
    job_id: str,
    variant: str,
    priority: int,
    in_flight: int = 0,
    shared: int | None = None,
) -> None:
    """`enqueue_job` for the API's event loop: the marker and the message in one MULTI/EXEC, so
    both are written or neither, in one round trip (no thread, no kombu producer). The same
    transaction counts the submission for /metrics (core/metrics.py) and appends the job's
    `queued` event (core/events.py)."""
    settings: Settings = app.conf.gemmaq_settings
    queue, message = task_message(
        app, job_id=job_id, variant=variant, priority=priority, in_flight=in_flight, shared=shared
    )
    marker = message_key(settings, job_id)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(marker, marker_value(), ex=MESSAGE_MARKER_TTL_S)
            pipe.lpush(queue, message)
            pipe.hincrby(submitted_key(settings), variant, 1)
            add_status(pipe, settings, job_id, "queued")
            await pipe.execute()
    except Exception:
        with contextlib.suppress(redis_errors.RedisError):  # it may have gone through after all
            await redis.delete(marker)
        raise

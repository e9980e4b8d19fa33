"""A raw Celery round trip: a no-op task through Redis and back (result backend on Redis too).

BENCH_REDIS_URL=redis://… celery -A bench.refs.noop_celery worker --pool=threads -c 32
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("noop", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_transport_options={"global_keyprefix": "noop:"},
    result_backend_transport_options={"global_keyprefix": "noop:"},
    worker_hijack_root_logger=False,
)


@app.task(name="noop")  # type: ignore[untyped-decorator]
def noop(value: int) -> int:
    return value

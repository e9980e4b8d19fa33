"""PostgreSQL failover: gemmaq follows a two-host URL when its primary goes and a standby takes over.

Two local servers, a primary and a streaming standby (pg_basebackup), both made here with the
binaries pgserver ships; gemmaq is given libpq's multi-host URL with
`target_session_attrs=read-write`. Under load from two tenants, with clients following jobs over
SSE, the primary either crashes (`-m immediate`) and the standby is promoted, or turns read-only
while it stays up (a switchover) and the standby, caught up, is promoted. Every job ends
`succeeded` once with its result and metrics, each tenant is charged what its jobs used, no
slot stays held, and no call answers 500.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from gemmaq.servers import PostgresProcess, PostgresStandby, RedisProcess
from tests.helpers.failover import ENV, VARIANTS, Loaded, ride_out, save, start
from tests.helpers.stack import stack_on

pytestmark = pytest.mark.faults

JOBS_PER_TENANT = 50


@dataclass
class Pair(Loaded):
    primary: PostgresProcess
    standby: PostgresStandby


@contextmanager
def pg_pair(folder: Path, namespace: str, *, synchronous: bool) -> Iterator[Pair]:
    primary = PostgresProcess()
    standby = PostgresStandby(primary=primary, synchronous=synchronous)
    rd = RedisProcess(folder / "redis")
    try:
        primary.start()
        primary.sql('CREATE DATABASE "gemmaq"')
        standby.start()
        standby.wait_streaming()
        rd.start()
        url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/gemmaq"
               "?target_session_attrs=read-write")  # fmt: skip
        with stack_on(folder, url, rd.url, namespace=namespace, variants=VARIANTS, env=ENV) as stack:
            tenants = start(stack, "echo-ha")
            yield Pair(stack, tenants, lambda: redis.Redis.from_url(rd.url), primary, standby)
    finally:
        standby.remove()
        primary.remove()
        rd.stop()


def test_the_primary_crashes_and_its_synchronous_standby_is_promoted(tmp_path: Path) -> None:
    """Synchronous: every commit the API or a worker was told of is on the standby too."""
    with pg_pair(tmp_path, "pg-crash", synchronous=True) as pair:

        def crash() -> None:
            pair.primary.stop("immediate")
            pair.standby.promote()

        save(pair, ride_out(pair, "postgres-crash", crash, JOBS_PER_TENANT))


def test_a_switchover_where_the_old_primary_stays_up_read_only(tmp_path: Path) -> None:
    """Asynchronous: the old primary stops taking writes, the standby replays all it was sent
    and is promoted; connections still open to the old primary are refused their writes."""
    with pg_pair(tmp_path, "pg-switch", synchronous=False) as pair:

        def switch() -> None:
            pair.primary.sql("ALTER SYSTEM SET default_transaction_read_only = on")
            pair.primary.sql("SELECT pg_reload_conf()")
            pair.standby.wait_streaming()
            pair.standby.promote()

        save(pair, ride_out(pair, "postgres-switchover", switch, JOBS_PER_TENANT))

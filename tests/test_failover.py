"""Redis failover: gemmaq follows a Sentinel group when its master dies or is switched over.

A master, a replica and three sentinels run on loopback ports (gemmaq.servers.RedisHA), and the
stack is given one `redis+sentinel://` URL. Under load from two tenants, with clients following
jobs over SSE, the master is SIGKILLed while its replica is held back (so the replica misses the
master's last writes, as asynchronous replication does under load), and later switched back with
both servers alive. Every job ends `succeeded` once, each tenant is charged what its jobs used,
no concurrency slot stays held, no call answers 500, and a cancel still stops its job.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gemmaq.servers import RedisHA
from tests.helpers.failover import ENV, VARIANTS, Loaded, cancel_stops_a_job, ride_out, save, start
from tests.helpers.stack import ha_stack

pytestmark = pytest.mark.faults

JOBS_PER_TENANT = 100


@dataclass
class HA(Loaded):
    sentinels: RedisHA


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HA]:
    folder = tmp_path_factory.mktemp("failover")
    with ha_stack(folder, namespace="ha", variants=VARIANTS, env=ENV) as (stack, _, sentinels):
        yield HA(stack, start(stack, "gemma-3-270m,echo-ha"), lambda: sentinels.master().client(), sentinels)


def test_the_master_killed_with_its_replica_behind(ha: HA) -> None:
    def kill_master() -> None:
        master, replica = ha.sentinels.master(), ha.sentinels.replica()
        replica.signal(signal.SIGSTOP)  # it stops taking the master's writes…
        time.sleep(2)
        master.signal(signal.SIGKILL)  # …which die with the master
        time.sleep(0.3)
        replica.signal(signal.SIGCONT)
        ha.sentinels.wait_master(replica)

    report = ride_out(ha, "redis-kill", kill_master, JOBS_PER_TENANT)
    old = next(n for n in ha.sentinels.nodes if n is not ha.sentinels.master())
    old.start()  # empty; the sentinels make it a replica of the new master
    ha.sentinels.wait_settled()
    assert old.role() == "slave"
    cancel_stops_a_job(ha)
    save(ha, report)


def test_a_switchover_back_with_both_servers_alive(ha: HA) -> None:
    def switch() -> None:
        replica = ha.sentinels.replica()
        ha.sentinels.failover()  # connections stay open to the demoted master: READONLY
        ha.sentinels.wait_master(replica)

    report = ride_out(ha, "redis-switchover", switch, JOBS_PER_TENANT)
    ha.sentinels.wait_settled()
    cancel_stops_a_job(ha)
    save(ha, report)

"""The quota scripts of core/quotas.py on a Redis of the session's own: admission (the per-minute
window, the concurrency cap, the day's token budget, batch lines outside the window), settlement
(a slot released once, tokens settled once), peeks and the seeding of a day's counter."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from api.admission import Releases, Reservation
from core.keys import cancel_key, job_done_channel
from core.quotas import (
    CONCURRENCY,
    OK,
    RATE,
    SEED,
    TOKENS,
    AsyncQuotas,
    Limits,
    SyncQuotas,
    parse_holders,
)
from core.settings import Settings
from db.endings import Ended, settle
from gemmaq.servers import RedisProcess

pytestmark = pytest.mark.unit

DAY = date(2026, 3, 14)
USER = "user_unit"


def limits(rpm: int = 1000, jobs: int = 1000, tokens: int = 1_000_000) -> Limits:
    return Limits(requests_per_minute=rpm, tokens_per_day=tokens, max_concurrent_jobs=jobs, max_input_bytes=1)


@pytest.fixture
def settings(embedded_redis: str) -> Settings:
    """A namespace of the test's own on the session's Redis."""
    return Settings(redis_url=embedded_redis, namespace=f"unit-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def sync_redis(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.broker_url)
    yield client
    client.close()


def run(settings: Settings, scenario: Callable[[AsyncQuotas], Awaitable[None]]) -> None:
    """The scenario on the API's side of the quotas (an asyncio client of its own)."""

    async def main() -> None:
        client = AsyncRedis.from_url(settings.broker_url)
        try:
            await scenario(AsyncQuotas(client, settings))
        finally:
            await client.aclose()

    asyncio.run(main())


def test_nothing_is_admitted_before_the_days_counter_is_seeded(settings: Settings) -> None:
    async def scenario(q: AsyncQuotas) -> None:
        first = await q.admit(user_id=USER, limits=limits(), job_id="j1", reserve=10, day=DAY)
        assert first.outcome == SEED and first.snapshot.tokens_charged is None
        peek = await q.peek(user_id=USER, limits=limits(), day=DAY)
        assert (peek.rate.used, peek.active_jobs, peek.tokens_charged) == (0, 0, None)  # nothing taken
        await q.seed(user_id=USER, day=DAY, settled=25)
        admitted = await q.admit(user_id=USER, limits=limits(), job_id="j1", reserve=10, day=DAY)
        assert admitted.outcome == OK and admitted.details == {}
        snapshot = admitted.snapshot
        assert (snapshot.rate.used, snapshot.active_jobs, snapshot.tokens_charged) == (1, 1, 35)

    run(settings, scenario)


def test_the_per_minute_window_refuses_past_its_limit(settings: Settings) -> None:
    three = limits(rpm=3)

    async def scenario(q: AsyncQuotas) -> None:
        await q.seed(user_id=USER, day=DAY, settled=0)
        for i in range(3):
            admitted = await q.admit(user_id=USER, limits=three, job_id=f"j{i}", reserve=1, day=DAY)
            assert admitted.outcome == OK and admitted.snapshot.rate.remaining == 2 - i
        refused = await q.admit(user_id=USER, limits=three, job_id="j3", reserve=1, day=DAY)
        assert refused.outcome == RATE
        assert refused.details == {"limit": "requests_per_minute", "value": 3, "used": 3}
        assert refused.snapshot.rate.remaining == 0 and 1 <= refused.snapshot.rate.reset_s <= 60
        headers = refused.snapshot.rate.headers()
        assert headers["RateLimit-Limit"] == "3" and headers["RateLimit-Remaining"] == "0"
        after = await q.peek(user_id=USER, limits=three, day=DAY)
        assert (after.rate.used, after.active_jobs, after.tokens_charged) == (
            3,
            3,
            3,
        )  # the refusal took none
        other = await q.admit(user_id="user_other", limits=three, job_id="x", reserve=1, day=DAY)
        assert other.outcome == SEED  # another user's window is their own (and unseeded)

    run(settings, scenario)


def test_the_concurrency_cap_holds_until_a_slot_is_settled(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    two = limits(jobs=2)
    workers = SyncQuotas(sync_redis, settings)

    async def scenario(q: AsyncQuotas) -> None:
        await q.seed(user_id=USER, day=DAY, settled=0)
        for job in ("a", "b"):
            assert (await q.admit(user_id=USER, limits=two, job_id=job, reserve=5, day=DAY)).outcome == OK
        refused = await q.admit(user_id=USER, limits=two, job_id="c", reserve=5, day=DAY)
        assert refused.outcome == CONCURRENCY
        assert refused.details == {"limit": "max_concurrent_jobs", "value": 2, "active": 2}
        assert workers.settle(user_id=USER, job_id="a", day=DAY, actual=3)  # a worker ends job a
        assert (await q.admit(user_id=USER, limits=two, job_id="c", reserve=5, day=DAY)).outcome == OK

    run(settings, scenario)


def test_the_days_token_budget_counts_reservations_and_settled_usage(settings: Settings) -> None:
    hundred = limits(tokens=100)

    async def scenario(q: AsyncQuotas) -> None:
        await q.seed(user_id=USER, day=DAY, settled=30)
        assert (await q.admit(user_id=USER, limits=hundred, job_id="a", reserve=50, day=DAY)).outcome == OK
        refused = await q.admit(user_id=USER, limits=hundred, job_id="b", reserve=30, day=DAY)
        assert refused.outcome == TOKENS
        assert refused.details == {"limit": "tokens_per_day", "value": 100, "charged": 80, "requested": 30}
        exact = await q.admit(user_id=USER, limits=hundred, job_id="c", reserve=20, day=DAY)  # to the token
        assert exact.outcome == OK and exact.snapshot.tokens_charged == 100
        assert await q.settle(user_id=USER, job_id="a", day=DAY, actual=10)  # used 10 of its 50
        assert (await q.admit(user_id=USER, limits=hundred, job_id="b", reserve=30, day=DAY)).outcome == OK
        # Another day has a budget of its own.
        tomorrow = DAY + timedelta(days=1)
        await q.seed(user_id=USER, day=tomorrow, settled=0)
        later = await q.admit(user_id=USER, limits=hundred, job_id="d", reserve=90, day=tomorrow)
        assert later.outcome == OK and later.snapshot.tokens_charged == 90

    run(settings, scenario)


def test_batch_lines_take_slots_and_tokens_but_not_the_per_minute_window(settings: Settings) -> None:
    one = limits(rpm=1, jobs=10, tokens=1000)

    async def scenario(q: AsyncQuotas) -> None:
        await q.seed(user_id=USER, day=DAY, settled=0)
        for i in range(5):
            line = await q.admit(user_id=USER, limits=one, job_id=f"line{i}", reserve=10, day=DAY, batch=True)
            assert line.outcome == OK
        peek = await q.peek(user_id=USER, limits=one, day=DAY)
        assert (peek.rate.used, peek.active_jobs, peek.tokens_charged) == (0, 5, 50)
        assert (await q.admit(user_id=USER, limits=one, job_id="mine", reserve=10, day=DAY)).outcome == OK
        assert (await q.admit(user_id=USER, limits=one, job_id="again", reserve=10, day=DAY)).outcome == RATE
        capped = limits(rpm=1, jobs=6, tokens=1000)
        full = await q.admit(user_id=USER, limits=capped, job_id="line5", reserve=10, day=DAY, batch=True)
        assert full.outcome == CONCURRENCY  # the cap holds for lines too

    run(settings, scenario)


def test_settling_releases_the_slot_and_corrects_the_tokens_once(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    workers = SyncQuotas(sync_redis, settings)

    async def scenario(q: AsyncQuotas) -> None:
        await q.seed(user_id=USER, day=DAY, settled=0)
        for job in ("a", "b"):
            await q.admit(user_id=USER, limits=limits(), job_id=job, reserve=50, day=DAY)
        assert workers.settle(user_id=USER, job_id="a", day=DAY, actual=20)
        assert not workers.settle(user_id=USER, job_id="a", day=DAY, actual=20)  # a redelivery
        assert not await q.settle(user_id=USER, job_id="a", day=DAY, actual=999)  # and from the API
        peek = await q.peek(user_id=USER, limits=limits(), day=DAY)
        assert (peek.active_jobs, peek.tokens_charged) == (1, 70)  # b's reservation and a's use
        assert await q.settle(user_id=USER, job_id="b", day=DAY, actual=0)  # withdrawn: nothing used
        peek = await q.peek(user_id=USER, limits=limits(), day=DAY)
        assert (peek.active_jobs, peek.tokens_charged) == (0, 20)
        assert not workers.settle(user_id=USER, job_id="never-admitted", day=DAY, actual=5)
        assert (await q.peek(user_id=USER, limits=limits(), day=DAY)).tokens_charged == 20

    run(settings, scenario)


def test_settling_after_the_days_counter_is_gone_only_releases_the_slot(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    async def scenario(q: AsyncQuotas) -> None:
        await q.seed(user_id=USER, day=DAY, settled=0)
        await q.admit(user_id=USER, limits=limits(), job_id="a", reserve=50, day=DAY)
        sync_redis.delete(q.keys(USER).tokens(DAY))  # expired, or Redis lost it
        assert await q.settle(user_id=USER, job_id="a", day=DAY, actual=20)
        peek = await q.peek(user_id=USER, limits=limits(), day=DAY)
        assert (peek.active_jobs, peek.tokens_charged) == (0, None)  # not recreated: seeding will

    run(settings, scenario)


def test_peeking_changes_nothing_and_reads_the_key_epoch(settings: Settings) -> None:
    epoch_key = settings.key("auth", "epoch")

    async def scenario(q: AsyncQuotas) -> None:
        empty = await q.peek(user_id=USER, limits=limits(rpm=5), day=DAY)
        assert (empty.rate.used, empty.rate.reset_s, empty.active_jobs, empty.tokens_charged) == (
            0,
            0,
            0,
            None,
        )
        await q.seed(user_id=USER, day=DAY, settled=7)
        await q.admit(user_id=USER, limits=limits(rpm=5), job_id="a", reserve=3, day=DAY)
        seen = [await q.peek(user_id=USER, limits=limits(rpm=5), day=DAY) for _ in range(3)]
        assert {(s.rate.used, s.rate.remaining, s.active_jobs, s.tokens_charged) for s in seen} == {
            (1, 4, 1, 10)
        }
        assert 0 < seen[0].rate.reset_s <= 60
        first, epoch = await q.peek_epoch(user_id=USER, limits=limits(rpm=5), day=DAY, epoch_key=epoch_key,
                                          fresh="e1")  # fmt: skip
        assert epoch == "e1" and first.rate.used == 1
        _, again = await q.peek_epoch(user_id=USER, limits=limits(rpm=5), day=DAY, epoch_key=epoch_key,
                                      fresh="e2")  # fmt: skip
        assert again == "e1"  # set once, then read

    run(settings, scenario)


def test_seeding_gives_jobs_in_flight_their_slots_and_counts_the_days_reservations(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    yesterday = DAY - timedelta(days=1)

    async def scenario(q: AsyncQuotas) -> None:
        in_flight = [("today-1", 40, DAY), ("today-2", 60, DAY), ("yesterday", 500, yesterday)]
        await q.seed(user_id=USER, day=DAY, settled=100, in_flight=in_flight)
        peek = await q.peek(user_id=USER, limits=limits(), day=DAY)
        assert (peek.active_jobs, peek.tokens_charged) == (3, 200)  # yesterday's reservation is not today's
        holders = parse_holders(sync_redis.hgetall(q.keys(USER).active))
        assert {job: (h.tokens, h.day) for job, h in holders.items()} == {
            "today-1": (40, DAY), "today-2": (60, DAY), "yesterday": (500, yesterday)
        }  # fmt: skip
        # Seeding again (another API process raced this one) changes nothing.
        await q.seed(user_id=USER, day=DAY, settled=0, in_flight=[("today-1", 1, DAY)])
        again = await q.peek(user_id=USER, limits=limits(), day=DAY)
        assert (again.active_jobs, again.tokens_charged) == (3, 200)
        assert parse_holders(sync_redis.hgetall(q.keys(USER).active))["today-1"].tokens == 40
        # The seeded slots are settled like any other, against the day they were charged to.
        assert await q.settle(user_id=USER, job_id="today-1", day=DAY, actual=10)
        assert await q.settle(user_id=USER, job_id="yesterday", day=yesterday, actual=10)
        final = await q.peek(user_id=USER, limits=limits(), day=DAY)
        assert (final.active_jobs, final.tokens_charged) == (1, 170)

    run(settings, scenario)


def test_ending_a_batch_of_jobs_settles_each_once(settings: Settings, sync_redis: redis.Redis) -> None:
    """core.quotas.END, as db.endings runs it for the jobs that ended together: each slot released
    and its tokens settled, its cancel flag cleared and its done message published; again, nothing."""
    used = {"a": 5, "b": 15}
    ended = [
        Ended(job, USER, "echo", DAY, "succeeded", None, tokens, fresh=False) for job, tokens in used.items()
    ]
    done = sync_redis.pubsub()
    done.subscribe(*(job_done_channel(settings, e.job_id) for e in ended))

    async def scenario(q: AsyncQuotas) -> None:
        await q.seed(user_id=USER, day=DAY, settled=0)
        for e in ended:
            await q.admit(user_id=USER, limits=limits(), job_id=e.job_id, reserve=50, day=DAY)
        sync_redis.set(cancel_key(settings, "a"), 1)
        assert settle(sync_redis, settings, ended) == [True, True]
        assert settle(sync_redis, settings, ended) == [False, False]  # a redelivered end
        peek = await q.peek(user_id=USER, limits=limits(), day=DAY)
        assert (peek.active_jobs, peek.tokens_charged) == (0, 20)

    run(settings, scenario)
    assert not sync_redis.exists(cancel_key(settings, "a"))
    messages = [done.get_message(timeout=1) for _ in range(6)]  # 2 subscriptions, then 4 messages
    published = sorted(m["channel"].decode() for m in messages if m is not None and m["type"] == "message")
    assert published == sorted([job_done_channel(settings, e.job_id) for e in ended] * 2)
    done.close()


def test_a_release_redis_does_not_take_is_given_back_once_it_answers(tmp_path: Path) -> None:
    """What admission reserved for a job that was never queued goes back when Redis answers
    again (api/admission.py Releases), not a minute later by the reconciler's sweep."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    proc = server.proc
    assert proc is not None
    settings = Settings(redis_url=server.url, namespace="owed")

    async def main() -> None:
        client = AsyncRedis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3)
        quota = AsyncQuotas(client, settings)
        releases = Releases(quota)
        releases.start()
        try:
            await quota.seed(user_id=USER, day=DAY, settled=0)
            await quota.admit(user_id=USER, limits=limits(), job_id="never-queued", reserve=40, day=DAY)
            proc.send_signal(signal.SIGSTOP)  # Redis stops answering (a failover under way)
            await releases.give_back(USER, Reservation(job_id="never-queued", day=DAY, tokens=40))
            assert releases.owed == 1
            await asyncio.sleep(1)  # tries fail meanwhile
            proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 10
            while releases.owed:
                assert time.monotonic() < deadline, "the owed release was never given back"
                await asyncio.sleep(0.05)
            peek = await quota.peek(user_id=USER, limits=limits(), day=DAY)
            assert (peek.active_jobs, peek.tokens_charged) == (0, 0)
        finally:
            proc.send_signal(signal.SIGCONT)
            await releases.stop()
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        server.stop()

"""Quota admission and settlement in Redis: each step one Lua script, so it is atomic across
every API process and worker that shares the Redis.

Keys, under the settings' namespace, per user:

- ``quota:{user}:rate`` — sorted set of the submissions admitted in the last minute, scored
  by Redis server time in ms (an exact sliding window).
- ``quota:{user}:active`` — hash ``job_id → "tokens|day|admitted_ms"``: the jobs holding a
  concurrency slot (queued or running) and the tokens each reserved on its day.
- ``quota:{user}:tokens:{day}`` — tokens charged to that UTC day: settled usage plus open
  reservations. PostgreSQL's usage ledger is the record of truth; this counter is seeded
  from it when it is missing (a new day, a flushed Redis).

A slot and its reservation are released by `settle`, which deletes the job's hash entry
and adjusts the day counter only if the entry was still there: a second settle of the
same job (a redelivered message, a retry after a crash) changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from core.errors import QuotaExceeded
from core.keys import QuotaKeys
from core.scheduling import DEFAULT_MAX_PRIORITY
from core.settings import Settings

WINDOW_MS = 60_000
UNLIMITED = 2**31
DAY_TTL_S = 3 * 86_400
# A refused concurrent-jobs request: the earliest sensible retry (a slot frees when a job ends).
CONCURRENCY_RETRY_S = 2
# Admission estimates of input tokens; settlement replaces them with the real count.
BYTES_PER_TOKEN = 4
TOKENS_PER_IMAGE = 260
# Whisper charges its encoder's frames, 50 a second of audio (workers/engine/whisper.py), Gemma
# 3n about 6: a reservation takes the higher, so that no audio job is admitted short.
TOKENS_PER_AUDIO_SECOND = 50
TEMPLATE_TOKENS = 16

OK, RATE, CONCURRENCY, TOKENS, SEED = 0, 1, 2, 3, 4

_ADMIT = """
local rate, active, tokens = KEYS[1], KEYS[2], KEYS[3]
local rpm, max_jobs, per_day = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local job, reserve, day = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - tonumber(ARGV[7]))
local used = redis.call('ZCARD', rate)
local oldest = now
if used > 0 then oldest = tonumber(redis.call('ZRANGE', rate, 0, 0, 'WITHSCORES')[2]) end
local jobs = redis.call('HLEN', active)
local charged = redis.call('GET', tokens)
if used >= rpm then return {1, used, oldest, now, jobs, charged or -1} end
if jobs >= max_jobs then return {2, used, oldest, now, jobs, charged or -1} end
if not charged then return {4, used, oldest, now, jobs, -1} end
charged = tonumber(charged)
if charged + reserve > per_day then return {3, used, oldest, now, jobs, charged} end
if ARGV[9] == '1' then return {0, used, oldest, now, jobs, charged} end  -- a foresight: nothing taken
redis.call('ZADD', rate, now, job)
redis.call('PEXPIRE', rate, tonumber(ARGV[7]))
redis.call('HSET', active, job, reserve .. '|' .. day .. '|' .. now)
redis.call('INCRBY', tokens, reserve)
redis.call('EXPIRE', tokens, tonumber(ARGV[8]))
return {0, used + 1, oldest, now, jobs + 1, charged + reserve}
"""

_PEEK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = now - tonumber(ARGV[1])
local used = redis.call('ZCOUNT', KEYS[1], '(' .. since, '+inf')
local oldest = now
if used > 0 then
  local first = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  oldest = tonumber(first[2])
end
local reply = {used, oldest, now, redis.call('HLEN', KEYS[2]), redis.call('GET', KEYS[3]) or -1}
if KEYS[4] then  -- the API key epoch (core/keys.py), read in the same trip; set when missing
  local epoch = redis.call('GET', KEYS[4])
  if not epoch then
    epoch = ARGV[2]
    redis.call('SET', KEYS[4], epoch)
  end
  reply[6] = epoch
end
return reply
"""

# A device load one of the user's jobs is about to make: taken (0) while fewer than ARGV[1]
# were made in the last ARGV[2] ms, else the ms until the oldest of them leaves the window.
_LOAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])
  return math.max(1, oldest + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3] .. ':' .. now)
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""
LOAD_WINDOW_MS = 3_600_000  # `loads_per_user_per_hour`'s window

_SETTLE_FUNCTION = """
local function settle(active, tokens, job, actual)
  local entry = redis.call('HGET', active, job)
  if not entry then return -1 end
  redis.call('HDEL', active, job)
  local reserved = tonumber(string.match(entry, '^(%d+)'))
  if redis.call('EXISTS', tokens) == 1 then
    redis.call('INCRBY', tokens, tonumber(actual) - reserved)
  end
  return reserved
end
"""

_SETTLE = _SETTLE_FUNCTION + "return settle(KEYS[1], KEYS[2], ARGV[1], ARGV[2])\n"

# Jobs that ended, three keys (active, tokens, cancel flag) and three arguments (job, actual
# tokens, done channel) each: every one settled as above, its cancel flag cleared and its done
# message published — one round trip for the bookkeeping of a whole batch's end.
END = (
    _SETTLE_FUNCTION
    + """
local out = {}
for i = 1, #ARGV, 3 do
  redis.call('DEL', KEYS[i + 2])
  redis.call('PUBLISH', ARGV[i + 2], 'done')
  out[#out + 1] = settle(KEYS[i], KEYS[i + 1], ARGV[i], ARGV[i + 1])
end
return out
"""
)

# The day's counter, missing (a new day, or Redis flushed or restarted empty): the jobs still in
# flight get their slots back first (ARGV from the 4th: job, reserved tokens, day — from
# PostgreSQL), then the counter is the day's settled usage plus every reservation of the day.
_SEED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 4, #ARGV, 3 do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1] .. '|' .. ARGV[i + 2] .. '|' .. now)
end
local total = tonumber(ARGV[1])
for _, entry in ipairs(redis.call('HVALS', KEYS[2])) do
  local reserved, day = string.match(entry, '^(%d+)|([^|]+)|')
  if day == ARGV[2] then total = total + tonumber(reserved) end
end
redis.call('SET', KEYS[1], total, 'NX', 'EX', tonumber(ARGV[3]))
return total
"""


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int
    tokens_per_day: int
    max_concurrent_jobs: int
    max_input_bytes: int
    allowed_variants: list[str] | None = None
    max_storage_bytes: int = 0
    max_files: int = 0
    max_priority: int = DEFAULT_MAX_PRIORITY  # the highest priority its jobs reach among tenants'

    @classmethod
    def defaults(cls, settings: Settings) -> Limits:
        return cls(
            requests_per_minute=settings.quota_requests_per_minute,
            tokens_per_day=settings.quota_tokens_per_day,
            max_concurrent_jobs=settings.quota_max_concurrent_jobs,
            max_input_bytes=settings.quota_max_input_bytes,
            max_storage_bytes=settings.quota_max_storage_bytes,
            max_files=settings.quota_max_files,
            max_priority=settings.quota_max_priority,
        )


def check_storage(limits: Limits, *, files: int, used: int, adding: int, new_file: bool = True) -> None:
    """One more file (or, not `new_file`, a stored response) of `adding` bytes, beside the
    `files` and the `used` bytes the user keeps."""
    if new_file and files + 1 > limits.max_files:
        raise QuotaExceeded(
            f"you keep {files} files; your quota allows {limits.max_files} (delete some, or let them expire)",
            {"limit": "max_files", "value": limits.max_files, "files": files},
        )
    if used + adding > limits.max_storage_bytes:
        raise QuotaExceeded(
            f"your files and stored responses hold {used} bytes; {adding} more do not fit in your "
            f"{limits.max_storage_bytes}",
            {"limit": "max_storage_bytes", "value": limits.max_storage_bytes, "used_bytes": used},
        )


@dataclass(frozen=True)
class RateState:
    """The request window as the RateLimit-* headers tell it."""

    limit: int
    used: int
    reset_s: int  # until the oldest admission in the window leaves it; 0 when the window is empty

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
            "RateLimit-Policy": f"{self.limit};w={WINDOW_MS // 1000}",
        }


@dataclass(frozen=True)
class Snapshot:
    """What one script saw: the window, the slots held and the tokens charged today."""

    rate: RateState
    now_ms: int
    active_jobs: int
    tokens_charged: int | None  # None: today's counter is not seeded yet


@dataclass(frozen=True)
class Admission:
    outcome: int
    snapshot: Snapshot
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Holder:
    tokens: int
    day: date
    admitted_ms: int


def utc_day(now: datetime | None = None) -> date:
    return (now or datetime.now(UTC)).astimezone(UTC).date()


def next_midnight(now_ms: int) -> datetime:
    """When the day's token budget starts again (UTC)."""
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)


def seconds_to_midnight(now_ms: int) -> int:
    return max(1, math.ceil(next_midnight(now_ms).timestamp() - now_ms / 1000))


def estimate_input_tokens(*, text_bytes: int, images: int, audio_seconds: float) -> int:
    """An upper-leaning guess of the prompt's tokens before any tokenizer has seen it."""
    return (
        TEMPLATE_TOKENS
        + math.ceil(text_bytes / BYTES_PER_TOKEN)
        + images * TOKENS_PER_IMAGE
        + math.ceil(audio_seconds * TOKENS_PER_AUDIO_SECOND)
    )


def _snapshot(limit: int, used: int, oldest: int, now: int, jobs: int, charged: Any) -> Snapshot:
    reset = math.ceil(max(0, oldest + WINDOW_MS - now) / 1000) if used else 0
    tokens = int(charged)
    return Snapshot(
        rate=RateState(limit=limit, used=int(used), reset_s=reset),
        now_ms=int(now),
        active_jobs=int(jobs),
        tokens_charged=None if tokens < 0 else tokens,
    )


def _peeked(limits: Limits, reply: list[Any]) -> Snapshot:
    used, oldest, now, jobs, charged = reply[:5]
    return _snapshot(limits.requests_per_minute, int(used), int(oldest), int(now), int(jobs), charged)


def _admission(limits: Limits, reply: list[Any], reserve: int) -> Admission:
    outcome, used, oldest, now, jobs, charged = (int(v) for v in reply)
    snapshot = _snapshot(limits.requests_per_minute, used, oldest, now, jobs, charged)
    details: dict[str, Any] = {}
    if outcome == RATE:
        details = {"limit": "requests_per_minute", "value": limits.requests_per_minute, "used": used}
    elif outcome == CONCURRENCY:
        details = {"limit": "max_concurrent_jobs", "value": limits.max_concurrent_jobs, "active": jobs}
    elif outcome == TOKENS:
        details = {
            "limit": "tokens_per_day",
            "value": limits.tokens_per_day,
            "charged": charged,
            "requested": reserve,
        }
    return Admission(outcome=outcome, snapshot=snapshot, details=details)


class AsyncQuotas:
    """The API's side: admit, peek, seed and settle on an asyncio Redis client."""

    def __init__(self, redis: AsyncRedis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._admit = redis.register_script(_ADMIT)
        self._peek = redis.register_script(_PEEK)
        self._settle = redis.register_script(_SETTLE)
        self._seed = redis.register_script(_SEED)

    def keys(self, user_id: str) -> QuotaKeys:
        return QuotaKeys(self.settings, user_id)

    async def admit(
        self,
        *,
        user_id: str,
        limits: Limits,
        job_id: str,
        reserve: int,
        day: date,
        batch: bool = False,
        foresee: bool = False,
    ) -> Admission:
        """A batch's line (`batch`) takes a slot and its tokens but no part of the per-minute window.
        `foresee`: the same checks, and nothing taken (a missing day counter passes: the real
        admission seeds it)."""
        keys = self.keys(user_id)
        reply = await self._admit(
            keys=[keys.batch_rate if batch else keys.rate, keys.active, keys.tokens(day)],
            args=[
                UNLIMITED if batch else limits.requests_per_minute,
                limits.max_concurrent_jobs,
                limits.tokens_per_day,
                job_id,
                reserve,
                day.isoformat(),
                WINDOW_MS,
                DAY_TTL_S,
                int(foresee),
            ],
        )
        return _admission(limits, reply, reserve)

    async def seed(
        self, *, user_id: str, day: date, settled: int, in_flight: Sequence[tuple[str, int, date]] = ()
    ) -> None:
        """The day's counter from PostgreSQL: `settled` usage, and the jobs `in_flight` (id,
        reserved tokens, the day charged) holding their slots again."""
        keys = self.keys(user_id)
        jobs = [
            str(v) for job_id, tokens, charged in in_flight for v in (job_id, tokens, charged.isoformat())
        ]
        await self._seed(
            keys=[keys.tokens(day), keys.active], args=[settled, day.isoformat(), DAY_TTL_S, *jobs]
        )

    async def peek(self, *, user_id: str, limits: Limits, day: date) -> Snapshot:
        keys = self.keys(user_id)
        reply = await self._peek(keys=[keys.rate, keys.active, keys.tokens(day)], args=[WINDOW_MS])
        return _peeked(limits, reply)

    async def peek_epoch(
        self, *, user_id: str, limits: Limits, day: date, epoch_key: str, fresh: str
    ) -> tuple[Snapshot, str]:
        """`peek` and, in the same round trip, the value at `epoch_key` (set to `fresh` if none)."""
        keys = self.keys(user_id)
        reply = await self._peek(
            keys=[keys.rate, keys.active, keys.tokens(day), epoch_key], args=[WINDOW_MS, fresh]
        )
        return _peeked(limits, reply), _text(reply[5])

    async def settle(self, *, user_id: str, job_id: str, day: date, actual: int) -> bool:
        keys = self.keys(user_id)
        reserved = await self._settle(keys=[keys.active, keys.tokens(day)], args=[job_id, actual])
        return int(reserved) >= 0


class SyncQuotas:
    """The workers' and the reconciler's side: settle when a job reaches a terminal state."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._settle = redis.register_script(_SETTLE)
        self._load = redis.register_script(_LOAD)

    def settle(self, *, user_id: str, job_id: str, day: date, actual: int) -> bool:
        """True when this call released the slot (False: it was released before)."""
        keys = QuotaKeys(self.settings, user_id)
        reserved = self._settle(keys=[keys.active, keys.tokens(day)], args=[job_id, actual])
        return int(reserved) >= 0

    def take_load(self, *, user_id: str, job_id: str) -> float:
        """A device load for the user's job: 0 when it may make one (counted now), else the
        seconds until one of the user's `loads_per_user_per_hour` leaves the window."""
        keys = QuotaKeys(self.settings, user_id)
        limit = self.settings.loads_per_user_per_hour
        wait_ms = self._load(keys=[keys.loads], args=[limit, LOAD_WINDOW_MS, job_id])
        return int(wait_ms) / 1000


def parse_holders(entries: dict[Any, Any]) -> dict[str, Holder]:
    """An `active` hash as read from Redis: job id → what it reserved, on which day, and when."""
    out = {}
    for key, value in entries.items():
        tokens, day, admitted = _text(value).split("|")
        out[_text(key)] = Holder(int(tokens), date.fromisoformat(day), int(admitted))
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

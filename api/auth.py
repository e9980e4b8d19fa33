"""Who is calling: an API key is checked against PostgreSQL once, then kept in this process's memory.

A cached key stays good while the key epoch in Redis (`core.queues.key_epoch_key`) keeps the
value it had when the key was read from PostgreSQL; revoking a key or changing a quota writes
a new value (`renew_key_epoch`, from the admin routes and the CLI), so every API process reads
the key again on its next request. The epoch comes back in the same Redis round trip as the
caller's rate-limit window (`AsyncQuotas.peek_epoch`), so a request with a cached key costs
PostgreSQL nothing. If Redis cannot be read, the key is checked in PostgreSQL; an entry also
expires `MAX_AGE_S` after it was read, whatever the epoch says.

Keys that PostgreSQL does not know cost it nothing either, on their second try: they are kept
the same way, under the same epoch (creating a key renews it, so a new key is never refused).
A random key is new each time, so failures are also counted per client address in Redis:
past `auth_failures_per_minute`, the address gets 429 until its minute is over, and keys it
sends are not looked up, except keys this process has taken before: tenants behind one proxy
or NAT address are not locked out by another's failures. The count and the epoch come back in
one round trip.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.admission import limits_of
from core import quotas
from core.errors import RateLimited
from core.keys import auth_failures_key, key_epoch_key
from core.quotas import AsyncQuotas, Snapshot
from core.settings import Settings
from db.models import User
from db.repo import users as users_repo

log = structlog.get_logger(__name__)

MAX_AGE_S = 30.0
MAX_ENTRIES = 10_000
FAILURE_WINDOW_S = 60

# The epoch, set to a fresh value when it is missing (a new or restarted Redis), and the
# milliseconds left of the address's refusal (0: it may try; KEYS[2] absent: not counted).
_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
local refused = 0
if KEYS[2] and tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[2]) then
  refused = math.max(redis.call('PTTL', KEYS[2]), 1)
end
return {epoch, refused}
"""

# One more failed authentication from an address; its window starts with its first.
_FAILED = """
if redis.call('INCR', KEYS[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
"""


async def renew_key_epoch(redis: Redis, settings: Settings) -> None:
    """Keys or quotas changed in PostgreSQL: every API process reads its callers' keys again."""
    await redis.set(key_epoch_key(settings), uuid.uuid4().hex)


@dataclass(frozen=True)
class _Entry:
    user: User  # detached, its quota loaded; shared by the requests that present the key
    epoch: str
    until: float  # time.monotonic()


@dataclass(frozen=True)
class Caller:
    user: User
    snapshot: Snapshot | None  # the rate-limit window, for the RateLimit-* headers; None: Redis failed


class Authenticator:
    def __init__(
        self, maker: async_sessionmaker[AsyncSession], redis: Redis, quota: AsyncQuotas, settings: Settings
    ) -> None:
        self.maker = maker
        self.quota = quota
        self.settings = settings
        self._epoch_key = key_epoch_key(settings)
        self._epoch = redis.register_script(_EPOCH)
        self._failed = redis.register_script(_FAILED)
        self._entries: dict[str, _Entry] = {}
        self._unknown: dict[str, tuple[str, float]] = {}  # digest → (epoch, until)

    async def __call__(self, key: str, address: str | None = None) -> Caller | None:
        """The caller with this key and its rate-limit window; None for an unknown or revoked key.
        With the client's `address`, a failure counts against it, and an address past its
        failures is refused (`RateLimited`) before its key is looked up."""
        if not users_repo.well_formed(key):  # costs nothing: not counted
            return None
        digest = users_repo.hash_key(key)
        entry = self._entries.get(digest)
        if entry is not None and entry.until > time.monotonic():
            try:
                snapshot, epoch = await self.quota.peek_epoch(
                    user_id=entry.user.id,
                    limits=limits_of(entry.user, self.settings),
                    day=quotas.utc_day(),
                    epoch_key=self._epoch_key,
                    fresh=uuid.uuid4().hex,
                )
                if epoch == entry.epoch:
                    return Caller(entry.user, snapshot)
            except RedisError:
                pass
        return await self._load(digest, key, address)

    async def _load(self, digest: str, key: str, address: str | None) -> Caller | None:
        known = self._entries.pop(digest, None)  # a key this process took before, stale or not
        failures = [auth_failures_key(self.settings, address)] if address else []
        try:  # read before PostgreSQL: a change committed after this read renews it
            limit = self.settings.auth_failures_per_minute
            keys = [self._epoch_key, *failures]
            raw, refused = await self._epoch(keys=keys, args=[uuid.uuid4().hex, limit])
            epoch: str | None = _text(raw)
        except RedisError:
            epoch, refused = None, 0
        if refused and known is None:  # a tenant's known key is not refused for another's failures
            raise RateLimited(
                "too many failed authentications from this address; try again later",
                headers={"Retry-After": str(-(-int(refused) // 1000))},
            )
        now = time.monotonic()
        unknown = self._unknown.get(digest)
        if unknown is not None and unknown[0] == epoch and unknown[1] > now:
            await self._count_failure(address)
            return None
        async with self.maker() as session:
            user = await users_repo.authenticate(session=session, key=key)
        if user is None:
            if epoch is not None:
                _remember(self._unknown, digest, (epoch, now + MAX_AGE_S))
            await self._count_failure(address)
            return None
        self._unknown.pop(digest, None)
        if epoch is not None:
            _remember(self._entries, digest, _Entry(user, epoch, now + MAX_AGE_S))
        return Caller(user, await self._peek(user))

    async def _count_failure(self, address: str | None) -> None:
        if address is None:
            return
        try:
            await self._failed(keys=[auth_failures_key(self.settings, address)], args=[FAILURE_WINDOW_S])
        except RedisError:
            log.warning("auth.failure_count_failed")

    async def _peek(self, user: User) -> Snapshot | None:
        try:
            return await self.quota.peek(
                user_id=user.id, limits=limits_of(user, self.settings), day=quotas.utc_day()
            )
        except RedisError:
            log.warning("quota.peek_failed")
            return None


def _remember(entries: dict[str, Any], digest: str, entry: Any) -> None:
    if len(entries) >= MAX_ENTRIES:
        entries.pop(next(iter(entries)))
    entries[digest] = entry


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

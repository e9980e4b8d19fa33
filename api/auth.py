"""Who is calling: an API key is checked against PostgreSQL once, then kept in this process's memory.

A cached key stays good while the key epoch in Redis (`core.queues.key_epoch_key`) keeps the
value it had when the key was read from PostgreSQL; revoking a key or changing a quota writes
a new value (`renew_key_epoch`, from the admin routes and the CLI), so every API process reads
the key again on its next request. The epoch comes back in the same Redis round trip as the
caller's rate-limit window (`AsyncQuotas.peek_epoch`), so a request with a cached key costs
PostgreSQL nothing. If Redis cannot be read, the key is checked in PostgreSQL; an entry also
expires `MAX_AGE_S` after it was read, whatever the epoch says.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.admission import limits_of
from core import quotas
from core.keys import key_epoch_key
from core.quotas import AsyncQuotas, Snapshot
from core.settings import Settings
from db.models import User
from db.repo import users as users_repo

log = structlog.get_logger(__name__)

MAX_AGE_S = 30.0
MAX_ENTRIES = 10_000

# The epoch, set to a fresh value when it is missing (a new or restarted Redis).
_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
return epoch
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
        self._entries: dict[str, _Entry] = {}

    async def __call__(self, key: str) -> Caller | None:
        """The caller with this key and its rate-limit window; None for an unknown or revoked key."""
        if not users_repo.well_formed(key):
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
        return await self._load(digest, key)

    async def _load(self, digest: str, key: str) -> Caller | None:
        self._entries.pop(digest, None)
        try:  # read before PostgreSQL: a change committed after this read renews it
            epoch: str | None = _text(await self._epoch(keys=[self._epoch_key], args=[uuid.uuid4().hex]))
        except RedisError:
            epoch = None
        async with self.maker() as session:
            user = await users_repo.authenticate(session=session, key=key)
        if user is None:
            return None
        if epoch is not None:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.pop(next(iter(self._entries)))
            self._entries[digest] = _Entry(user, epoch, time.monotonic() + MAX_AGE_S)
        return Caller(user, await self._peek(user))

    async def _peek(self, user: User) -> Snapshot | None:
        try:
            return await self.quota.peek(
                user_id=user.id, limits=limits_of(user, self.settings), day=quotas.utc_day()
            )
        except RedisError:
            log.warning("quota.peek_failed")
            return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

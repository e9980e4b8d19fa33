"""LoRA adapters: created, listed, published and deleted by the API (async); read by workers (sync).

An adapter is visible to its owner, and to every tenant once an admin has made it public; only
its owner deletes it. Adapters never expire; they count toward the owner's storage quota
(`db.repo.files.storage_used`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.models import Adapter


def _visible(user_id: str) -> ColumnElement[bool]:
    return or_(Adapter.user_id == user_id, Adapter.public.is_(True))


def _own_first(user_id: str) -> tuple[ColumnElement[Any] | InstrumentedAttribute[Any], ...]:
    """Ordering: the user's own adapters before public ones, then by name (oldest first on a tie)."""
    return (Adapter.user_id != user_id, Adapter.name, Adapter.created_at, Adapter.id)


def stored_bytes(config: dict[str, Any], weights: bytes) -> int:
    """What an adapter counts in its owner's storage quota: its weights and its config as JSON."""
    return len(weights) + len(json.dumps(config).encode())


async def create(
    *,
    session: AsyncSession,
    user_id: str,
    name: str,
    base: str,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    config: dict[str, Any],
    weights: bytes,
) -> Adapter:
    adapter = Adapter(
        user_id=user_id,
        name=name,
        base=base,
        rank=rank,
        alpha=alpha,
        target_modules=sorted(target_modules),
        config=config,
        weights=weights,
        size=stored_bytes(config, weights),
        sha256=hashlib.sha256(weights).hexdigest(),
        public=False,
    )
    session.add(adapter)
    await session.flush()
    await session.refresh(adapter, ["created_at"])
    return adapter


async def name_taken(*, session: AsyncSession, user_id: str, name: str) -> bool:
    """Whether the user has an adapter of this name already (names are unique per owner)."""
    taken = exists().where(Adapter.user_id == user_id, Adapter.name == name)
    return bool((await session.execute(select(taken))).scalar())


async def list_visible(*, session: AsyncSession, user_id: str) -> list[Adapter]:
    """The user's adapters, then the public ones of others, each in name order."""
    rows = await session.execute(select(Adapter).where(_visible(user_id)).order_by(*_own_first(user_id)))
    return list(rows.scalars())


async def get_visible(*, session: AsyncSession, user_id: str, adapter_id: str) -> Adapter | None:
    stmt = select(Adapter).where(Adapter.id == adapter_id, _visible(user_id))
    return (await session.execute(stmt)).scalar_one_or_none()


async def resolve(*, session: AsyncSession, user_id: str, base: str, name: str) -> Adapter | None:
    """The adapter of the variant `base` that the user may run, named `name` (or whose id it is):
    their own, else a public one (the oldest, should several owners have published that name)."""
    stmt = (
        select(Adapter)
        .where(or_(Adapter.name == name, Adapter.id == name), Adapter.base == base, _visible(user_id))
        .order_by(Adapter.id != name, *_own_first(user_id))
        .limit(1)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def delete_own(*, session: AsyncSession, user_id: str, adapter_id: str) -> bool:
    """Deletes the adapter if the user owns it (a public adapter of another's is not theirs to delete)."""
    result = await session.execute(
        delete(Adapter).where(Adapter.id == adapter_id, Adapter.user_id == user_id)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def set_public(*, session: AsyncSession, adapter_id: str, public: bool = True) -> Adapter | None:
    """An admin's: the adapter (whoever owns it) made public to every tenant, or private again."""
    adapter = await session.get(Adapter, adapter_id, with_for_update=True)
    if adapter is None:
        return None
    adapter.public = public
    await session.flush()
    return adapter


def digest(*, session: Session, adapter_id: str, user_id: str) -> tuple[str, dict[str, Any]] | None:
    """Worker side: the sha256 of an adapter's weights and its config, if `user_id` may use it
    (their own, or a public one); None otherwise, or when it is gone."""
    row = session.execute(
        select(Adapter.sha256, Adapter.config).where(Adapter.id == adapter_id, _visible(user_id))
    ).one_or_none()
    return None if row is None else (str(row.sha256), dict(row.config))


def read_adapter(*, session: Session, adapter_id: str) -> tuple[dict[str, Any], bytes] | None:
    """Worker side: an adapter's config (adapter_config.json as uploaded) and its weights (the
    adapter_model.safetensors bytes as uploaded); None when it is gone. The API resolved the id
    for the job's owner (`resolve`), so no owner is checked here."""
    row = session.execute(
        select(Adapter.config, Adapter.weights).where(Adapter.id == adapter_id)
    ).one_or_none()
    if row is None:
        return None
    return dict(row.config), bytes(row.weights)

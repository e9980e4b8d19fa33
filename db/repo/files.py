"""Uploaded files: created, listed and deleted by the API (async); read by workers (sync)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, undefer

from db.models import Adapter, Batch, File, FilePart, Quota, StoredResponse
from db.repo import pages
from db.repo import responses as responses_repo

MAX_PAGE = 100
JSONL = "application/jsonl"  # the content type of a batch input file, kept in parts
# A file past its expires_at is gone for its owner at once; the reconciler deletes it later.
_LIVE = or_(File.expires_at.is_(None), File.expires_at > func.now())


def expiry(seconds: int | None) -> datetime | None:
    """When a file kept `seconds` from now expires (None: kept until deleted)."""
    return None if seconds is None else datetime.now(UTC) + timedelta(seconds=seconds)


async def storage_used(*, session: AsyncSession, user_id: str, lock: bool = False) -> tuple[int, int]:
    """The user's files and LoRA adapters (each counts as a file), and the bytes of their files,
    adapters and stored responses. `lock`: the user's quota row is locked for the transaction, so
    that two uploads cannot both fit in the room one had."""
    if lock:
        await session.execute(select(Quota.user_id).where(Quota.user_id == user_id).with_for_update())
    count, size = (
        await session.execute(
            select(func.count(), func.coalesce(func.sum(File.size), 0)).where(File.user_id == user_id, _LIVE)
        )
    ).one()
    responses = (
        await session.execute(
            select(func.coalesce(func.sum(StoredResponse.bytes), 0)).where(
                StoredResponse.user_id == user_id, responses_repo.LIVE
            )
        )
    ).scalar_one()
    adapters, adapter_bytes = (  # adapters never expire
        await session.execute(
            select(func.count(), func.coalesce(func.sum(Adapter.size), 0)).where(Adapter.user_id == user_id)
        )
    ).one()
    return int(count) + int(adapters), int(size) + int(responses) + int(adapter_bytes)


def delete_expired(*, session: Session, limit: int = 200) -> int:
    """Files past their expires_at, with their parts (the reconciler); a batch's input is kept
    while the batch is."""
    expired = (
        select(File.id)
        .where(File.expires_at <= func.now(), ~exists().where(Batch.input_file_id == File.id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = session.execute(delete(File).where(File.id.in_(expired.scalar_subquery())))
    return int(result.rowcount)  # type: ignore[attr-defined]


async def create_file(
    *,
    session: AsyncSession,
    user_id: str,
    purpose: str,
    filename: str,
    content: bytes,
    content_type: str,
    media: dict[str, Any] | None,
    expires_at: datetime | None = None,
) -> File:
    file = File(
        expires_at=expires_at,
        user_id=user_id,
        purpose=purpose,
        filename=filename,
        content=content,
        content_type=content_type,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        media=media,
    )
    session.add(file)
    await session.flush()
    await session.refresh(file, ["created_at"])
    return file


async def get_file(
    *, session: AsyncSession, user_id: str, file_id: str, content: bool = False
) -> File | None:
    stmt = select(File).where(File.id == file_id, File.user_id == user_id, _LIVE)
    if content:
        stmt = stmt.options(undefer(File.content))
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_files(*, session: AsyncSession, user_id: str, file_ids: list[str]) -> dict[str, File]:
    rows = await session.execute(select(File).where(File.id.in_(file_ids), File.user_id == user_id, _LIVE))
    return {f.id: f for f in rows.scalars()}


async def list_files(
    *, session: AsyncSession, user_id: str, purpose: str | None, after: File | None, limit: int
) -> tuple[list[File], bool]:
    stmt = select(File).where(File.user_id == user_id, _LIVE)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    return await pages.page(session, stmt, File.created_at, File.id, after, limit)


async def delete_file(*, session: AsyncSession, user_id: str, file_id: str) -> bool:
    result = await session.execute(delete(File).where(File.id == file_id, File.user_id == user_id, _LIVE))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def read_contents(*, session: Session, user_id: str, file_ids: list[str]) -> dict[str, bytes]:
    """Worker side: the bytes of a job's media files (only the job owner's)."""
    rows = session.execute(
        select(File.id, File.content).where(File.id.in_(file_ids), File.user_id == user_id)
    ).all()
    return {file_id: bytes(content) for file_id, content in rows}


# ---- batch files: stored in parts of whole lines (db.models.FilePart) ----------------------


async def create_parted_file(
    *,
    session: AsyncSession,
    user_id: str,
    purpose: str,
    filename: str,
    parts: AsyncIterator[tuple[bytes, int]],
    expires_at: datetime | None = None,
) -> File:
    """A file written part by part (bytes of whole lines, their line count), never whole in
    memory; `media` records its line count."""
    file = File(
        user_id=user_id, purpose=purpose, filename=filename, content=b"", content_type=JSONL,
        size=0, sha256="", media=None, expires_at=expires_at,
    )  # fmt: skip
    session.add(file)
    await session.flush()
    digest, size, lines, seq = hashlib.sha256(), 0, 0, 0
    async for data, count in parts:
        session.add(FilePart(file_id=file.id, seq=seq, lines=count, data=data))
        await session.flush()
        session.expunge_all()  # the part's bytes are not kept
        digest.update(data)
        size, lines, seq = size + len(data), lines + count, seq + 1
    await session.execute(
        update(File)
        .where(File.id == file.id)
        .values(size=size, sha256=digest.hexdigest(), media={"lines": lines, "parts": seq})
    )
    refreshed = await session.get(File, file.id, populate_existing=True)
    assert refreshed is not None
    return refreshed


async def read_part(*, session: AsyncSession, file_id: str, seq: int) -> FilePart | None:
    return await session.get(FilePart, (file_id, seq))

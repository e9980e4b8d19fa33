"""Files: media for jobs and JSONL for batches, stored in PostgreSQL, visible to their owner only."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, UploadFile, status
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import SessionMakerDep, SettingsDep, UserDep
from api.errors import responses
from core.errors import NotFound, PayloadTooLarge, UnsupportedMedia, ValidationFailed
from core.media import sniff_media
from core.settings import Settings
from db.models import File
from db.repo import files as files_repo

router = APIRouter(tags=["files"])

Purpose = Literal["media", "batch"]
CHUNK = 1024 * 1024


class FileOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    content_type: str
    sha256: str
    media: dict[str, Any] | None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_out(file: File) -> FileOut:
    return FileOut(
        id=file.id,
        bytes=file.size,
        created_at=int(file.created_at.timestamp()),
        filename=file.filename,
        purpose=file.purpose,
        content_type=file.content_type,
        sha256=file.sha256,
        media=file.media,
    )


async def _read_capped(upload: UploadFile, limit: int) -> bytes:
    parts, size = [], 0
    while chunk := await upload.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"file: more than {limit} bytes", {"limit": limit})
        parts.append(chunk)
    return b"".join(parts)


def _check_batch(data: bytes) -> None:
    """A batch input is UTF-8 JSON Lines: one JSON object a line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsupportedMedia("file: a batch file must be UTF-8 JSON Lines") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ValidationFailed(f"file: line {number} is not a JSON object", {"line": number})
    if "\x00" in text:
        raise ValidationFailed("file: NUL characters are not allowed")


def _sniff(data: bytes, purpose: str, settings: Settings) -> tuple[str, dict[str, Any] | None]:
    if not data:
        raise ValidationFailed("file: the file is empty")
    if purpose == "batch":
        _check_batch(data)
        return "application/jsonl", None
    info = sniff_media(data, settings)
    return info.content_type, info.as_dict()


@router.post(
    "/files",
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 413, 415, 422, 503),
    summary="Upload a file (multipart)",
)
async def upload_file(
    file: UploadFile,
    purpose: Annotated[Purpose, Form(description="media: images and audio for jobs; batch: JSONL requests")],
    user: UserDep,
    maker: SessionMakerDep,
    settings: SettingsDep,
) -> FileOut:
    """The type is found by sniffing the bytes; the file name is kept only as a label."""
    data = await _read_capped(file, settings.files_max_bytes)
    content_type, media = await run_in_threadpool(_sniff, data, purpose, settings)
    filename = (file.filename or "upload").replace("\x00", "")[:255] or "upload"
    async with maker() as session, session.begin():
        stored = await files_repo.create_file(
            session=session,
            user_id=user.id,
            purpose=purpose,
            filename=filename,
            content=data,
            content_type=content_type,
            media=media,
        )
    return file_out(stored)


async def _owned(maker: SessionMakerDep, user_id: str, file_id: str, content: bool = False) -> File:
    async with maker() as session:
        file = await files_repo.get_file(session=session, user_id=user_id, file_id=file_id, content=content)
    if file is None:
        raise NotFound(f"no file {file_id!r}")
    return file


@router.get("/files/{file_id}", responses=responses(401, 404), summary="A file's metadata")
async def get_file(file_id: str, user: UserDep, maker: SessionMakerDep) -> FileOut:
    return file_out(await _owned(maker, user.id, file_id))


@router.get(
    "/files/{file_id}/content",
    responses={**responses(401, 404), 200: {"content": {"application/octet-stream": {}}}},
    response_class=Response,
    summary="A file's bytes",
)
async def get_file_content(file_id: str, user: UserDep, maker: SessionMakerDep) -> Response:
    file = await _owned(maker, user.id, file_id, content=True)
    return Response(
        content=bytes(file.content),
        media_type=file.content_type,
        headers={"Content-Disposition": f'attachment; filename="{file.id}"'},
    )


@router.get("/files", responses=responses(401, 422), summary="List your files, newest first")
async def list_files(
    user: UserDep,
    maker: SessionMakerDep,
    purpose: Purpose | None = None,
    after: Annotated[str | None, Query(max_length=64, description="a file id: the page after it")] = None,
    limit: Annotated[int, Query(ge=1, le=files_repo.MAX_PAGE)] = 20,
) -> FileList:
    async with maker() as session:
        anchor = None
        if after is not None:
            anchor = await files_repo.get_file(session=session, user_id=user.id, file_id=after)
            if anchor is None:
                raise ValidationFailed("after: not one of your files", {"after": after})
        files, more = await files_repo.list_files(
            session=session, user_id=user.id, purpose=purpose, after=anchor, limit=limit
        )
    return FileList(data=[file_out(f) for f in files], has_more=more)


@router.delete("/files/{file_id}", responses=responses(401, 404), summary="Delete a file")
async def delete_file(file_id: str, user: UserDep, maker: SessionMakerDep) -> FileDeleted:
    async with maker() as session, session.begin():
        deleted = await files_repo.delete_file(session=session, user_id=user.id, file_id=file_id)
    if not deleted:
        raise NotFound(f"no file {file_id!r}")
    return FileDeleted(id=file_id, deleted=True)

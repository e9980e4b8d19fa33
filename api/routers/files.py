"""Files: media for jobs and JSONL for batches, stored in PostgreSQL, visible to their owner only."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, UploadFile, status
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from api import admission
from api.deps import SessionMakerDep, SettingsDep, UserDep
from api.errors import responses
from api.media_admission import read_capped
from core import quotas
from core.errors import Conflict, NotFound, PayloadTooLarge, QuotaExceeded, UnsupportedMedia, ValidationFailed
from core.media_checks import AUDIO_FORMATS, IMAGE_FORMATS, sniff_media
from core.openai_files import FileDeleted, FileList, FileOut, file_out
from core.settings import Settings
from db.models import File
from db.repo import files as files_repo

router = APIRouter(tags=["files"])

Purpose = Literal["media", "batch", "batch_output"]  # batch_output: a batch's output and error files
PART = 1024 * 1024  # a batch file's parts: about this many bytes of whole lines
MAX_RETENTION_S = 30 * 86_400 * 12  # `expires_after[seconds]`: up to a year
# What a file's bytes are served as: the sniffed media type, or JSON Lines for batch input.
CONTENT_TYPES = sorted({*IMAGE_FORMATS.values(), *AUDIO_FORMATS.values(), files_repo.JSONL})


def _check_lines(data: bytes, first: int) -> int:
    """Whole lines of a batch input — UTF-8 JSON Lines, one JSON object a line (blank lines
    skipped); `first` is the first line's number. Returns how many lines hold a request."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsupportedMedia("file: a batch file must be UTF-8 JSON Lines") from exc
    if "\x00" in text:
        raise ValidationFailed("file: NUL characters are not allowed")
    count = 0
    for number, line in enumerate(text.split("\n"), start=first):
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except RecursionError:  # too deep to check here: the batch runner makes it a line error
            ok = line.lstrip().startswith("{")
        except ValueError:
            ok = False
        if not ok:
            raise ValidationFailed(f"file: line {number} is not a JSON object", {"line": number})
        count += 1
    return count


async def _jsonl_parts(upload: UploadFile, limit: int, room: int) -> AsyncIterator[tuple[bytes, int]]:
    """The upload in parts of whole lines, about `PART` bytes each, checked as they come; past
    `limit` bytes a 413, past the `room` left in the owner's storage quota a 429."""
    size, carry, line = 0, b"", 1
    while True:
        chunk = await upload.read(PART)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"file: more than {limit} bytes", {"limit": limit})
        if size > room:
            raise QuotaExceeded(
                f"file: more than the {max(room, 0)} bytes left in your storage quota",
                {"limit": "max_storage_bytes", "room_bytes": max(room, 0)},
            )
        data = carry + chunk
        cut = data.rfind(b"\n") + 1 if chunk else len(data)
        part, carry = data[:cut], data[cut:]
        if part:
            count = await run_in_threadpool(_check_lines, part.rstrip(b"\n"), line)
            line += part.count(b"\n") + (0 if part.endswith(b"\n") else 1)
            yield part if part.endswith(b"\n") else part + b"\n", count
        if not chunk:
            if size == 0:
                raise ValidationFailed("file: the file is empty")
            return


def _sniff(data: bytes, settings: Settings) -> tuple[str, dict[str, Any] | None]:
    if not data:
        raise ValidationFailed("file: the file is empty")
    info = sniff_media(data, settings)
    return info.content_type, info.as_dict()


@router.post(
    "/files",
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 413, 415, 422, 429, 503),
    summary="Upload a file (multipart)",
)
async def upload_file(
    file: UploadFile,
    purpose: Annotated[
        Literal["media", "batch"], Form(description="media: images and audio for jobs; batch: JSONL requests")
    ],
    user: UserDep,
    maker: SessionMakerDep,
    settings: SettingsDep,
    expires_anchor: Annotated[Literal["created_at"] | None, Form(alias="expires_after[anchor]")] = None,
    expires_seconds: Annotated[
        int | None,
        Form(alias="expires_after[seconds]", ge=3600, le=MAX_RETENTION_S, description="kept this long"),
    ] = None,
) -> FileOut:
    """Media: the type is found by sniffing the bytes, of which no more than the largest media
    limit is ever read. Batch input: JSON Lines, read and stored in parts (never whole in memory),
    each line checked to be a JSON object. The file name is kept only as a label. A file counts
    toward its owner's storage quota (bytes and files) until it is deleted or expires:
    `expires_after` (OpenAI's shape), else the deployment's `files_retention_s`."""
    filename = (file.filename or "upload").replace("\x00", "")[:255] or "upload"
    limits = admission.limits_of(user, settings)
    expires_at = files_repo.expiry(expires_seconds or settings.files_retention_s)
    if purpose == "batch":
        async with maker() as session, session.begin():
            files, used = await files_repo.storage_used(session=session, user_id=user.id, lock=True)
            quotas.check_storage(limits, files=files, used=used, adding=0)
            parted = await files_repo.create_parted_file(
                session=session, user_id=user.id, purpose=purpose, filename=filename, expires_at=expires_at,
                parts=_jsonl_parts(file, settings.files_max_bytes, limits.max_storage_bytes - used),
            )  # fmt: skip
            if not (parted.media or {}).get("lines"):
                raise ValidationFailed("file: no request lines")  # rolls the file back
        return file_out(parted)
    media_limit = max(settings.media_max_image_bytes, settings.media_max_audio_bytes)
    data = await read_capped(file, min(settings.files_max_bytes, media_limit))
    content_type, media = await run_in_threadpool(_sniff, data, settings)
    async with maker() as session, session.begin():
        files, used = await files_repo.storage_used(session=session, user_id=user.id, lock=True)
        quotas.check_storage(limits, files=files, used=used, adding=len(data))
        stored = await files_repo.create_file(
            session=session,
            user_id=user.id,
            purpose=purpose,
            filename=filename,
            content=data,
            content_type=content_type,
            media=media,
            expires_at=expires_at,
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
    responses={**responses(401, 404), 200: {"content": {t: {} for t in CONTENT_TYPES}}},
    response_class=Response,
    summary="A file's bytes",
)
async def get_file_content(file_id: str, user: UserDep, maker: SessionMakerDep) -> Response:
    headers = {"Content-Disposition": f'attachment; filename="{file_id}"'}
    file = await _owned(maker, user.id, file_id, content=True)
    if not (file.media or {}).get("parts"):
        return Response(content=bytes(file.content), media_type=file.content_type, headers=headers)
    parts = int((file.media or {})["parts"])

    async def stream() -> AsyncIterator[bytes]:  # part by part, never the whole file in memory
        for seq in range(parts):
            async with maker() as session:
                part = await files_repo.read_part(session=session, file_id=file_id, seq=seq)
            if part is not None:
                yield bytes(part.data)

    headers["Content-Length"] = str(file.size)
    return StreamingResponse(stream(), media_type=file.content_type, headers=headers)


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


@router.delete("/files/{file_id}", responses=responses(401, 404, 409), summary="Delete a file")
async def delete_file(file_id: str, user: UserDep, maker: SessionMakerDep) -> FileDeleted:
    try:
        async with maker() as session, session.begin():
            deleted = await files_repo.delete_file(session=session, user_id=user.id, file_id=file_id)
    except IntegrityError as exc:  # the input file of a batch (kept while the batch is)
        raise Conflict(f"file {file_id!r} is a batch's input", {"file_id": file_id}) from exc
    if not deleted:
        raise NotFound(f"no file {file_id!r}")
    return FileDeleted(id=file_id, deleted=True)

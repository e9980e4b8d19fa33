"""The OpenAI File object, as `/v1/files` returns it (with gemmaq's `content_type`, `sha256` and
`media`), and its list and deletion shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel


class FileRow(Protocol):
    """What `file_out` reads of a file (db.models.File)."""

    id: str
    size: int
    created_at: datetime
    filename: str
    purpose: str
    content_type: str
    sha256: str
    media: dict[str, Any] | None
    expires_at: datetime | None


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
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_out(file: FileRow) -> FileOut:
    return FileOut(
        id=file.id,
        bytes=file.size,
        created_at=int(file.created_at.timestamp()),
        filename=file.filename,
        purpose=file.purpose,
        content_type=file.content_type,
        sha256=file.sha256,
        media=file.media,
        expires_at=int(file.expires_at.timestamp()) if file.expires_at else None,
    )

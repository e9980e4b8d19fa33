"""Media parts of a job at admission: checked against the limits, stored as files, referenced by id;
and uploaded media read no further than its cap.

Inline (base64) media becomes a file of the caller's, so a job row and its Redis
message stay small and workers read every image or clip the same way. What a file's bytes are
(format, size, pixels, seconds) is found by core/media_checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import UploadFile
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from core.errors import NotFound, PayloadTooLarge, ValidationFailed
from core.media_checks import MediaInfo, decode_base64, inspect_audio, inspect_image
from core.quotas import Limits, check_storage
from core.schemas import AudioPart, ImagePart, JobCreate
from core.settings import Settings
from core.variants import Variant, VariantRegistry
from db.repo import files as files_repo


@dataclass(frozen=True)
class MediaTotals:
    """A job's media in all: what the quota counts (bytes) and estimates tokens from."""

    images: int
    audio_seconds: float
    bytes: int


NO_MEDIA = MediaTotals(images=0, audio_seconds=0.0, bytes=0)
UPLOAD_CHUNK = 1024 * 1024


@dataclass
class InlineMedia:
    part: ImagePart | AudioPart
    data: bytes
    info: MediaInfo


def check_parts(spec: JobCreate, variant: Variant, settings: Settings, variants: VariantRegistry) -> None:
    """Counts and kinds, before any byte is decoded."""
    parts = spec.input.media()
    if len(parts) > settings.media_max_parts:
        raise ValidationFailed(
            f"input: {len(parts)} media parts; at most {settings.media_max_parts} per job",
            {"parts": len(parts), "limit": settings.media_max_parts},
        )
    kinds = {p.type for p in parts}
    for kind in sorted(kinds):
        if kind not in variant.tasks:
            serving = variants.serving(kind)
            raise ValidationFailed(
                f"variant {variant.name!r} does not take {kind} input; variants that do: {serving}",
                {"variant": variant.name, "part": kind, "variants": serving},
            )
    if variant.engine == "whisper":
        if spec.input.tools:
            raise ValidationFailed(
                f"{variant.name} transcribes speech; it takes no tools", {"variant": variant.name}
            )
        language = (spec.params.language or "en").lower()
        if variant.english_only and language not in ("en", "english"):
            raise ValidationFailed(f"{variant.name} hears English only", {"language": spec.params.language})
    if spec.task == "text" and kinds:
        raise ValidationFailed(
            f"a text job takes no {'/'.join(sorted(kinds))} parts; send task {sorted(kinds)[0]!r}",
            {"task": spec.task},
        )
    if spec.task in ("image", "audio") and spec.task not in kinds:
        raise ValidationFailed(
            f"a {spec.task} job needs at least one {spec.task} part in its messages", {"task": spec.task}
        )


def _inspect_inline(spec: JobCreate, settings: Settings) -> list[InlineMedia]:
    out = []
    for index, part in enumerate(spec.input.media()):
        if part.data is None:
            continue
        where = f"input media part {index} ({part.type})"
        data = decode_base64(part.data, where)
        inspect = inspect_image if part.type == "image" else inspect_audio
        out.append(InlineMedia(part, data, inspect(data, settings, where)))
    return out


async def inspect_inline(spec: JobCreate, settings: Settings) -> list[InlineMedia]:
    """Decode and check inline media (CPU work, off the event loop)."""
    if not any(p.data is not None for p in spec.input.media()):
        return []
    return await run_in_threadpool(_inspect_inline, spec, settings)


async def store_media(
    *,
    session: AsyncSession,
    user_id: str,
    spec: JobCreate,
    inline: list[InlineMedia],
    max_audio_seconds: float | None = None,
    retention_s: int | None = None,
    limits: Limits | None = None,
) -> MediaTotals:
    """Inside the job's transaction: store inline media as files, within the caller's storage
    quota (`limits`) as an upload would be; check referenced files are the caller's (and, where
    the model takes one window of audio per job, that the clips fit in it)."""
    seconds = sum(item.info.seconds or 0.0 for item in inline)
    size = sum(len(item.data) for item in inline)
    if inline and limits is not None:
        files, used = await files_repo.storage_used(session=session, user_id=user_id, lock=True)
        for n, item in enumerate(inline):
            check_storage(limits, files=files + n, used=used, adding=len(item.data))
            used += len(item.data)
    for item in inline:
        stored = await files_repo.create_file(
            session=session,
            user_id=user_id,
            purpose="media",
            filename=f"inline.{item.info.format.lower()}",
            content=item.data,
            content_type=item.info.content_type,
            media=item.info.as_dict(),
            expires_at=files_repo.expiry(retention_s),
        )
        item.part.data, item.part.file_id = None, stored.id
    stored_now = {id(i.part) for i in inline}
    referenced = [p for p in spec.input.media() if p.file_id is not None and id(p) not in stored_now]
    if referenced:
        more_seconds, more_bytes = await _check_referenced(session, user_id, referenced)
        seconds, size = seconds + more_seconds, size + more_bytes
    if max_audio_seconds is not None and seconds > max_audio_seconds:
        raise PayloadTooLarge(
            f"input: {seconds:.1f} s of audio in all; at most {max_audio_seconds:g} s per job here",
            {"seconds": round(seconds, 3), "limit_seconds": max_audio_seconds},
        )
    images = sum(1 for p in spec.input.media() if p.type == "image")
    return MediaTotals(images=images, audio_seconds=seconds, bytes=size)


async def _check_referenced(
    session: AsyncSession, user_id: str, referenced: list[ImagePart | AudioPart]
) -> tuple[float, int]:
    """Each referenced file is the caller's media of the part's kind; returns their seconds and bytes."""
    files = await files_repo.get_files(
        session=session, user_id=user_id, file_ids=[p.file_id for p in referenced if p.file_id]
    )
    seconds, size = 0.0, 0
    for part in referenced:
        file = files.get(part.file_id or "")
        if file is None:
            raise NotFound(f"no file {part.file_id!r}", {"file_id": part.file_id})
        kind = (file.media or {}).get("kind")
        if file.purpose != "media" or kind != part.type:
            raise ValidationFailed(
                f"file {part.file_id!r} is not {part.type} media (it is {kind or file.purpose})",
                {"file_id": part.file_id, "expected": part.type},
            )
        seconds += float((file.media or {}).get("seconds") or 0.0)
        size += file.size
    return seconds, size


async def read_capped(upload: UploadFile, limit: int) -> bytes:
    """An uploaded file's bytes, read no further than `limit` (413 past it)."""
    parts, size = [], 0
    while chunk := await upload.read(UPLOAD_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"file: more than {limit} bytes", {"limit": limit})
        parts.append(chunk)
    return b"".join(parts)

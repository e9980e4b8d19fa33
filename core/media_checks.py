"""Media checks at admission: the format is sniffed from the bytes, limits are checked before decoding.

Images go through Pillow (PNG, JPEG, WebP, GIF — first frame); audio through
soundfile/libsndfile (WAV, FLAC, OGG, MP3). Every refusal is a 413, 415 or 422.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import asdict, dataclass
from typing import Any, Literal

import soundfile
from PIL import Image, UnidentifiedImageError

from core.errors import PayloadTooLarge, UnsupportedMedia, ValidationFailed
from core.settings import Settings

# Pillow's own bomb check fires inside open(), before the size is known to us; gemmaq
# checks `media_max_image_pixels` from the header itself, before anything is decoded.
Image.MAX_IMAGE_PIXELS = None

# MPO is how Pillow names a multi-picture JPEG (common from phone cameras).
IMAGE_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
# WAVEX / RF64 are how libsndfile names WAV with WAVE_FORMAT_EXTENSIBLE / 64-bit sizes.
AUDIO_FORMATS = {
    "WAV": "audio/wav",
    "WAVEX": "audio/wav",
    "RF64": "audio/wav",
    "FLAC": "audio/flac",
    "OGG": "audio/ogg",
    "MP3": "audio/mpeg",
}
OPEN_FORMATS = ["PNG", "JPEG", "WEBP", "GIF"]  # the decoders Pillow may try (JPEG also yields MPO)
MAX_SAMPLE_RATE = 48_000
MAX_CHANNELS = 8
BLOCK_FRAMES = 65_536
MediaKind = Literal["image", "audio"]


@dataclass(frozen=True)
class MediaInfo:
    kind: MediaKind
    format: str
    content_type: str
    bytes: int
    width: int | None = None
    height: int | None = None
    seconds: float | None = None
    sample_rate: int | None = None
    channels: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def decode_base64(data: str, where: str) -> bytes:
    """Base64, optionally as a data URL (`data:image/png;base64,...`)."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise ValidationFailed(f"{where}: a data URL must be base64-encoded", {"where": where})
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationFailed(f"{where}: `data` is not valid base64", {"where": where}) from exc


def _check_bytes(data: bytes, limit: int, kind: str, where: str) -> None:
    """413 for media over its size cap; `kind` as the message says it ("images", "audio")."""
    if len(data) > limit:
        raise PayloadTooLarge(
            f"{where}: {len(data)} bytes; {kind} may be at most {limit} bytes",
            {"where": where, "bytes": len(data), "limit": limit},
        )


def inspect_image(data: bytes, settings: Settings, where: str = "image") -> MediaInfo:
    _check_bytes(data, settings.media_max_image_bytes, "images", where)
    try:
        image = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)  # reads the header only
        fmt = image.format or ""
        width, height = image.size
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(
            f"{where}: not a PNG, JPEG, WebP or GIF image", {"where": where, "allowed": list(IMAGE_FORMATS)}
        ) from exc
    except Exception as exc:  # a header Pillow chokes on
        raise ValidationFailed(f"{where}: the image header is corrupt", {"where": where}) from exc
    if fmt not in IMAGE_FORMATS:
        raise UnsupportedMedia(
            f"{where}: {fmt or 'unknown'} images are not accepted; send PNG, JPEG, WebP or GIF",
            {"where": where, "format": fmt, "allowed": list(IMAGE_FORMATS)},
        )
    if width * height > settings.media_max_image_pixels:
        raise _too_many_pixels(where, width, height, settings)
    try:
        image.seek(0)
        image.load()  # the first frame, decoded in full: truncated or corrupt data fails here
    except Exception as exc:
        raise ValidationFailed(f"{where}: the {fmt} data is truncated or corrupt", {"where": where}) from exc
    return MediaInfo("image", fmt, IMAGE_FORMATS[fmt], len(data), width=width, height=height)


def _too_many_pixels(where: str, width: int, height: int, settings: Settings) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{where}: {width}x{height} pixels; images may have at most {settings.media_max_image_pixels} pixels",
        {"where": where, "width": width, "height": height, "limit_pixels": settings.media_max_image_pixels},
    )


def inspect_audio(data: bytes, settings: Settings, where: str = "audio") -> MediaInfo:
    _check_bytes(data, settings.media_max_audio_bytes, "audio", where)
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as exc:
        raise UnsupportedMedia(
            f"{where}: not a WAV, FLAC, OGG or MP3 file", {"where": where, "allowed": list(AUDIO_FORMATS)}
        ) from exc
    fmt = str(info.format)
    if fmt not in AUDIO_FORMATS:
        raise UnsupportedMedia(
            f"{where}: {fmt} audio is not accepted; send WAV, FLAC, OGG or MP3",
            {"where": where, "format": fmt, "allowed": list(AUDIO_FORMATS)},
        )
    seconds = float(info.frames) / info.samplerate if info.samplerate else 0.0
    if seconds > settings.media_max_audio_seconds:
        raise PayloadTooLarge(
            f"{where}: {seconds:.1f} s of audio; at most {settings.media_max_audio_seconds:g} s per clip",
            {"where": where, "seconds": round(seconds, 3), "limit_seconds": settings.media_max_audio_seconds},
        )
    if info.frames <= 0:
        raise ValidationFailed(f"{where}: the audio holds no samples", {"where": where})
    if info.samplerate > MAX_SAMPLE_RATE or info.channels > MAX_CHANNELS:
        raise ValidationFailed(
            f"{where}: {info.samplerate} Hz x {info.channels} channels; at most {MAX_SAMPLE_RATE} Hz and "
            f"{MAX_CHANNELS} channels",
            {"where": where, "sample_rate": info.samplerate, "channels": info.channels},
        )
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:  # decoded block by block: bounded memory
            for _ in sound.blocks(BLOCK_FRAMES, dtype="float32"):
                pass
    except Exception as exc:
        raise ValidationFailed(f"{where}: the {fmt} data is truncated or corrupt", {"where": where}) from exc
    return MediaInfo(
        "audio",
        fmt,
        AUDIO_FORMATS[fmt],
        len(data),
        seconds=round(seconds, 3),
        sample_rate=int(info.samplerate),
        channels=int(info.channels),
    )


def _is_image(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except Exception:
        return False
    return True


def _is_audio(data: bytes) -> bool:
    try:
        return str(soundfile.info(io.BytesIO(data)).format) in AUDIO_FORMATS
    except Exception:
        return False


def sniff_media(data: bytes, settings: Settings, where: str = "file") -> MediaInfo:
    """An uploaded media file: image or audio, whichever its bytes are (then that kind's limits)."""
    if _is_image(data):
        return inspect_image(data, settings, where)
    if _is_audio(data):
        return inspect_audio(data, settings, where)
    raise UnsupportedMedia(
        f"{where}: neither an image (PNG, JPEG, WebP, GIF) nor audio (WAV, FLAC, OGG, MP3)",
        {"where": where, "allowed": ["PNG", "JPEG", "WEBP", "GIF", "WAV", "FLAC", "OGG", "MP3"]},
    )

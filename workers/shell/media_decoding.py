"""A job's media decoded on the worker: its files' bytes (read from PostgreSQL) made into the
images and waveforms the processor takes.

Images: Pillow, first frame, RGB, no larger than `media_decode_max_side` on its longer side
(the processors read far less: Gemma 3 896 pixels a side, Gemma 3n 768), so that a 25 MP
upload becomes about 10 MB of pixels, not 75 MB; JPEG decodes at a reduced scale to begin
with (Pillow's `draft`). Audio: soundfile (libsndfile: WAV, FLAC, OGG, MP3), mixed to mono
float32, resampled with soxr to the rate the model's feature extractor expects (16 kHz for
Gemma 3n and Whisper).

What a job's media takes once decoded is known from the files' headers before any of it is
decoded (`decoded_bytes`): a worker holds at most `worker_media_mb` of it at once, for the
jobs in hand together (`MediaBudget`); a job waits for its share.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile
import soxr
from PIL import Image, ImageOps

from workers.shared.base import RequestError

SAMPLING_RATE = 16_000
MAX_SIDE = 1792  # the default of `media_decode_max_side`: twice the side Gemma 3's processor reads
PIXEL_BYTES = 4  # Pillow keeps an RGB pixel in 4 bytes
FLOAT_BYTES = 4


@dataclass
class Loaded:
    messages: list[dict[str, Any]]
    images: int
    audio_clips: int
    audio_seconds: float
    ms: float
    bytes: int  # the decoded images' pixels and waveforms' samples


class MediaBudget:
    """Bytes of decoded media a worker holds at once: `hold` waits until a job's share fits
    beside the jobs' already holding theirs (a share larger than the whole is cut to it, so
    that a job alone always runs)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self.used + nbytes <= self.total)
            self.used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


def file_ids(messages: list[dict[str, Any]]) -> list[str]:
    return [
        part["file_id"]
        for m in messages
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part.get("type") in ("image", "audio") and "file_id" in part
    ]


def kept_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """An image's size once decoded: its own, or scaled down to `max_side` on its longer side."""
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def decoded_bytes(
    contents: list[tuple[str, bytes]], max_side: int = MAX_SIDE, rate: int = SAMPLING_RATE
) -> int:
    """What the media parts (kind, file bytes) take once decoded, read from their headers: every
    image's kept pixels and every waveform, plus the largest image's full frame (decoded one at a
    time before it is scaled down). A file whose header cannot be read counts nothing: its
    decoding fails."""
    kept = frame = 0
    for kind, data in contents:
        try:
            if kind == "image":
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                w, h = kept_size(width, height, max_side)
                kept += w * h * PIXEL_BYTES
                frame = max(frame, width * height * PIXEL_BYTES * 2)  # as read, and as RGB
            else:
                info = soundfile.info(io.BytesIO(data))
                kept += int(info.duration * rate + 1) * FLOAT_BYTES
        except Exception:
            continue
    return kept + frame


def decode_image(data: bytes, max_side: int = MAX_SIDE) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.seek(0)  # GIF: the first frame
    image.draft("RGB", kept_size(*image.size, max_side))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return ImageOps.exif_transpose(rgb)


def decode_audio(data: bytes, rate: int = SAMPLING_RATE) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Mono float32 at `rate`; mixed down block by block, so many channels never sit in memory."""
    with soundfile.SoundFile(io.BytesIO(data)) as sound:
        source_rate = sound.samplerate
        blocks = [b.mean(axis=1) for b in sound.blocks(65_536, dtype="float32", always_2d=True)]
    mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if source_rate != rate:
        mono = soxr.resample(mono, source_rate, rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def media_parts(messages: list[dict[str, Any]], contents: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """(kind, file bytes) of each media part whose file is at hand."""
    return [
        (part["type"], contents[part["file_id"]])
        for m in messages
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part.get("type") in ("image", "audio") and part.get("file_id") in contents
    ]


def load_media(
    messages: list[dict[str, Any]],
    contents: dict[str, bytes],
    rate: int = SAMPLING_RATE,
    max_side: int = MAX_SIDE,
) -> Loaded:
    """The job's messages with each media part's payload decoded in place."""
    start = time.perf_counter()
    images = clips = nbytes = 0
    seconds = 0.0
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind not in ("image", "audio"):
                parts.append(part)
                continue
            data = contents.get(part["file_id"])
            if data is None:
                raise RequestError(f"media file {part['file_id']} no longer exists")
            try:
                if kind == "image":
                    image = decode_image(data, max_side)
                    parts.append({"type": "image", "image": image})
                    images += 1
                    nbytes += image.width * image.height * PIXEL_BYTES
                else:
                    audio = decode_audio(data, rate)
                    parts.append({"type": "audio", "audio": audio})
                    clips += 1
                    seconds += len(audio) / rate
                    nbytes += audio.nbytes
            except RequestError:
                raise
            except Exception as exc:
                raise RequestError(f"media file {part['file_id']} could not be decoded") from exc
        out.append({"role": message["role"], "content": parts})
    return Loaded(out, images, clips, round(seconds, 3), (time.perf_counter() - start) * 1000, nbytes)

"""A job's media decoded on the worker: its files' bytes (read from PostgreSQL) made into the
images and waveforms the processor takes.

Images: Pillow, first frame, RGB. Audio: soundfile (libsndfile: WAV, FLAC, OGG, MP3),
mixed to mono float32, resampled with soxr to the rate the model's feature extractor
expects (16 kHz for Gemma 3n and Whisper).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile
import soxr
from PIL import Image, ImageOps

from workers.shared.base import RequestError

SAMPLING_RATE = 16_000


@dataclass
class Loaded:
    messages: list[dict[str, Any]]
    images: int
    audio_clips: int
    audio_seconds: float
    ms: float


def file_ids(messages: list[dict[str, Any]]) -> list[str]:
    return [
        part["file_id"]
        for m in messages
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part.get("type") in ("image", "audio") and "file_id" in part
    ]


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.seek(0)  # GIF: the first frame
    return ImageOps.exif_transpose(image.convert("RGB"))


def decode_audio(data: bytes, rate: int = SAMPLING_RATE) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Mono float32 at `rate`; mixed down block by block, so many channels never sit in memory."""
    with soundfile.SoundFile(io.BytesIO(data)) as sound:
        source_rate = sound.samplerate
        blocks = [b.mean(axis=1) for b in sound.blocks(65_536, dtype="float32", always_2d=True)]
    mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if source_rate != rate:
        mono = soxr.resample(mono, source_rate, rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_media(
    messages: list[dict[str, Any]], contents: dict[str, bytes], rate: int = SAMPLING_RATE
) -> Loaded:
    """The job's messages with each media part's payload decoded in place."""
    start = time.perf_counter()
    images = clips = 0
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
                    parts.append({"type": "image", "image": decode_image(data)})
                    images += 1
                else:
                    audio = decode_audio(data, rate)
                    parts.append({"type": "audio", "audio": audio})
                    clips += 1
                    seconds += len(audio) / rate
            except RequestError:
                raise
            except Exception as exc:
                raise RequestError(f"media file {part['file_id']} could not be decoded") from exc
        out.append({"role": message["role"], "content": parts})
    return Loaded(out, images, clips, round(seconds, 3), (time.perf_counter() - start) * 1000)

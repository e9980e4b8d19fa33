"""Media made on the spot for tests: images with Pillow, speech with espeak-ng, tones with numpy."""

from __future__ import annotations

import base64
import io
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image


def png(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def jpeg(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(noise).save(out, "JPEG", quality=90)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def tone_wav(seconds: float, rate: int = 16_000, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    soundfile.write(out, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return out.getvalue()


def speech_wav(text: str, folder: Path) -> bytes:
    """`espeak-ng -w out.wav TEXT`: real synthetic speech."""
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is needed (apt-get install espeak-ng; `make test` installs it)"
    path = folder / "speech.wav"
    subprocess.run([espeak, "-w", str(path), text], check=True, capture_output=True)
    return path.read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

"""What admission reserves for a job covers what its engine will charge: an audio job's
reservation is not a seventh of what Whisper counts."""

from __future__ import annotations

import math

import pytest

from core.quotas import estimate_input_tokens
from workers.engine.whisper import ENCODER_FRAMES_PER_SECOND

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seconds", [0.5, 1.0, 10.0, 29.0])
def test_an_audio_reservation_covers_whisper_s_charge(seconds: float) -> None:
    charged = math.ceil(seconds * ENCODER_FRAMES_PER_SECOND)  # what WhisperEngine reports as input
    assert estimate_input_tokens(text_bytes=0, images=0, audio_seconds=seconds) >= charged

"""`client.audio.transcriptions` and `.translations` of the official `openai` package against
gemmaq, on Whisper base and espeak-ng speech, in every `response_format`."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest

from tests.helpers.media import speech_wav, tone_wav
from tests.helpers.stack import Stack

pytestmark = [
    pytest.mark.stack,
    # The openai SDK marks `audio.translations.create` deprecated (typing_extensions.deprecated,
    # message "deprecated"); the route is part of the API we serve, so the tests call it.
    pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning"),
]

SENTENCE = "the quick brown fox jumps over the lazy dog"
CUE = r"(\d\d:\d\d:\d\d[.,]\d\d\d) --> (\d\d:\d\d:\d\d[.,]\d\d\d)"


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


def seconds(clock: str) -> float:
    hours, minutes, rest = clock.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("speech")
    path = folder / "fox.wav"
    path.write_bytes(speech_wav(SENTENCE, folder))
    return path


@pytest.fixture
def oai(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=180)


def test_transcription_in_every_format(oai: openai.OpenAI, speech: Path) -> None:
    with speech.open("rb") as audio:
        plain = oai.audio.transcriptions.create(model="whisper-base", file=audio)
    assert words(plain.text) == SENTENCE
    with speech.open("rb") as audio:
        text = oai.audio.transcriptions.create(model="whisper-base", file=audio, response_format="text")
    assert words(text) == SENTENCE
    for kind in ("srt", "vtt"):
        with speech.open("rb") as audio:
            cues = oai.audio.transcriptions.create(model="whisper-base", file=audio, response_format=kind)
        timings = re.findall(CUE, cues)
        assert timings, cues
        assert all(seconds(a) < seconds(b) for a, b in timings)
        assert words(cues.split("\n", 1)[1]).endswith("lazy dog")
        assert cues.startswith("WEBVTT\n\n") if kind == "vtt" else cues.startswith("1\n")
    with speech.open("rb") as audio:
        verbose = oai.audio.transcriptions.create(
            model="whisper-base",
            file=audio,
            response_format="verbose_json",
            timestamp_granularities=["segment"],
        )
    assert verbose.language == "en" and 2.0 < verbose.duration < 4.0
    assert words(verbose.text) == SENTENCE
    segments = verbose.segments or []
    assert segments and words(" ".join(s.text for s in segments)) == SENTENCE
    ends = [0.0]
    for segment in segments:
        assert ends[-1] <= segment.start < segment.end <= verbose.duration + 0.5
        ends.append(segment.end)


def test_translation_returns_english(oai: openai.OpenAI, speech: Path) -> None:
    with speech.open("rb") as audio:
        english = oai.audio.translations.create(model="whisper-base", file=audio)
    assert "fox" in words(english.text) and "dog" in words(english.text)


def test_refusals(oai: openai.OpenAI, speech: Path) -> None:
    with speech.open("rb") as audio, pytest.raises(openai.UnprocessableEntityError):
        oai.audio.translations.create(model="whisper-tiny-en", file=audio)  # English only: no translation
    with speech.open("rb") as audio, pytest.raises(openai.UnprocessableEntityError):
        oai.audio.transcriptions.create(model="gemma-3-270m", file=audio)  # not a speech variant
    with pytest.raises(openai.APIStatusError) as long:
        oai.audio.transcriptions.create(model="whisper-base", file=("long.wav", tone_wav(40.0)))
    assert long.value.status_code in (413, 422)  # past the variant's audio length
    with pytest.raises(openai.APIStatusError) as junk:
        oai.audio.transcriptions.create(model="whisper-base", file=("junk.wav", b"not audio at all"))
    assert junk.value.status_code == 415

"""Speech recognition with transformers' Whisper classes: clips of many jobs in one `generate`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from workers.engine.generation import peak_memory
from workers.engine.sampling import RowSampler, RowStopper, needs_sampler
from workers.shared.base import CancelCheck, Request, RequestError, Result
from workers.shell.media_decoding import SAMPLING_RATE

MAX_SECONDS = 30.0  # one Whisper window
LEAD_IN_S = 0.5
ENCODER_FRAMES_PER_SECOND = 50


Clip = np.ndarray[Any, np.dtype[np.float32]]


def clip_of(request: Request) -> tuple[Clip, float]:
    """The request's audio as one clip, and the seconds of silence put before it."""
    clips = [
        part["audio"]
        for message in request.messages or []
        if not isinstance(message["content"], str)
        for part in message["content"]
        if part.get("type") == "audio"
    ]
    if not clips:
        raise RequestError("an audio job needs an audio part")
    gap = np.zeros(SAMPLING_RATE // 4, dtype=np.float32)
    joined = np.concatenate([x for clip in clips for x in (clip, gap)][:-1])
    seconds = len(joined) / SAMPLING_RATE
    if seconds > MAX_SECONDS:
        raise RequestError(f"whisper takes at most {MAX_SECONDS:g} s of audio per job")
    # Speech that starts at the first sample (synthetic speech does) is misheard more often;
    # half a second of silence on each side, where the 30 s window has room, helps Whisper.
    if seconds + 2 * LEAD_IN_S <= MAX_SECONDS:
        pad = np.zeros(int(LEAD_IN_S * SAMPLING_RATE), dtype=np.float32)
        return np.concatenate([pad, joined, pad]), LEAD_IN_S
    return joined, 0.0


class WhisperEngine:
    def __init__(
        self, *, name: str, model: Any, processor: Any, device: str, max_batch_size: int, translate: bool
    ) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.device = device
        self.torch_device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.can_translate = translate
        self.tokenizer = processor.tokenizer
        self.special = set(self.tokenizer.all_special_ids)
        self.timestamp_begin = self.tokenizer.convert_tokens_to_ids("<|0.00|>")

    def warmup(self) -> None:
        from core.schemas import GenerationParams

        silence = {"type": "audio", "audio": np.zeros(SAMPLING_RATE, dtype=np.float32)}
        request = Request(
            "warmup", [{"role": "user", "content": [silence]}], None, GenerationParams(max_new_tokens=2)
        )
        self.generate([request], lambda ids: [None] * len(ids))

    def _options(self, request: Request) -> tuple[str, str | None, bool]:
        params = request.params
        if params.audio_task == "translate":
            if not self.can_translate:
                raise RequestError(f"{self.name} transcribes English only; it does not translate")
            target = (params.target_language or "english").lower()
            if target not in ("en", "english"):
                raise RequestError(f"{self.name} translates into English only")
        return params.audio_task, params.language.lower() if params.language else None, params.timestamps

    def generate(self, batch: Sequence[Request], cancelled: CancelCheck) -> list[Result | Exception]:
        results: list[Result | Exception] = [RequestError("not run")] * len(batch)
        groups: dict[tuple[str, str | None, bool], list[tuple[int, tuple[Clip, float]]]] = {}
        for i, request in enumerate(batch):
            try:
                groups.setdefault(self._options(request), []).append((i, clip_of(request)))
            except RequestError as exc:
                results[i] = exc
        for (task, language, timestamps), members in groups.items():
            try:
                requests, clips = [batch[i] for i, _ in members], [c for _, c in members]
                outcomes: list[Result | Exception] = list(
                    self._run(requests, clips, task, language, timestamps, cancelled)
                )
            except ValueError as exc:  # e.g. a language Whisper does not know
                outcomes = [RequestError(f"whisper refused the request: {exc}")] * len(members)
            for (i, _), outcome in zip(members, outcomes, strict=True):
                results[i] = outcome
        return results

    def _run(
        self,
        batch: list[Request],
        padded: list[tuple[Clip, float]],
        task: str,
        language: str | None,
        timestamps: bool,
        cancelled: CancelCheck,
    ) -> list[Result]:
        """One `generate` for clips of one task and language; with `timestamps`, Whisper's
        timestamp tokens are kept and each result carries its segments and its language."""
        prep_start = time.perf_counter()
        clips = [clip for clip, _ in padded]
        features = self.processor.feature_extractor(
            clips, sampling_rate=SAMPLING_RATE, return_tensors="pt", return_attention_mask=True
        )
        prep_ms = (time.perf_counter() - prep_start) * 1000
        params = [r.params for r in batch]
        stopper = RowStopper(
            prompt_len=None,
            max_new_tokens=[p.max_new_tokens for p in params],
            stops=[p.stop for p in params],
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            job_ids=[r.job_id for r in batch],
            cancelled=cancelled,
            eos_ids=[self.tokenizer.eos_token_id],
        )
        processors = LogitsProcessorList(
            [RowSampler(params, self.torch_device)] if needs_sampler(params) else []
        )
        kwargs: dict[str, Any] = {"task": task} if self.can_translate else {}
        if language and self.can_translate:
            kwargs["language"] = language
        if timestamps:
            kwargs["return_timestamps"] = True
        if self.torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.torch_device)
        start = time.monotonic()
        with torch.inference_mode():
            output = self.model.generate(
                input_features=features.input_features.to(self.torch_device, self.model.dtype),
                attention_mask=features.attention_mask.to(self.torch_device),
                max_new_tokens=max(p.max_new_tokens for p in params),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stopper]),
                **kwargs,
            )
        end = time.monotonic()
        sequences = output.sequences if hasattr(output, "sequences") else output
        peak = peak_memory(self.torch_device)
        languages = self._languages(features, language) if timestamps else [None] * len(batch)
        results = []
        for row, request in enumerate(batch):
            tokens = [t for t in sequences[row].tolist() if t not in self.special]
            if stopper.lengths[row] is not None:
                tokens = tokens[: stopper.lengths[row]]
            extra: dict[str, Any] = {}
            if timestamps:
                extra = {"segments": self._segments(tokens, padded[row][1]), "language": languages[row]}
            tokens = [t for t in tokens if t < self.timestamp_begin]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip().replace("\x00", "\ufffd")
            cut = min((text.find(s) for s in request.params.stop if s in text), default=-1)
            reason = (
                "cancelled"
                if stopper.cancelled[row]
                else ("stop" if cut >= 0 or stopper.lengths[row] is None else "length")
            )
            text = text[:cut] if cut >= 0 else text
            ttft, inference_ms = stopper.timings(row, started=request.started, start=start, end=end)
            results.append(
                Result(
                    text=text,
                    finish_reason=reason,  # type: ignore[arg-type]
                    input_tokens=int(np.ceil(len(clips[row]) / SAMPLING_RATE * ENCODER_FRAMES_PER_SECOND)),
                    output_tokens=len(tokens),
                    time_to_first_token_ms=ttft,
                    inference_ms=inference_ms,
                    batch_size=len(batch),
                    peak_memory_bytes=peak,
                    preprocess_ms=prep_ms / len(batch),
                    extra=extra,
                )
            )
        return results

    def _segments(self, tokens: list[int], lead_s: float) -> list[dict[str, Any]]:
        """Whisper's segments: text between timestamp tokens, in seconds of the caller's audio."""
        offsets = self.tokenizer.decode(tokens, output_offsets=True, skip_special_tokens=True)["offsets"]
        return [
            {
                "start": round(max(0.0, o["timestamp"][0] - lead_s), 2),
                "end": round(max(0.0, o["timestamp"][1] - lead_s), 2),
                "text": o["text"].strip(),
            }
            for o in offsets
            if o["text"].strip()
        ]

    def _languages(self, features: Any, language: str | None) -> list[str | None]:
        """The language each clip is in: the one asked for, else the one Whisper detects."""
        count = features.input_features.shape[0]
        if language:
            return [language] * count
        if not self.can_translate:
            return ["en"] * count  # an English-only model
        with torch.inference_mode():
            ids = self.model.detect_language(
                input_features=features.input_features.to(self.torch_device, self.model.dtype)
            )
        return [self.tokenizer.convert_ids_to_tokens(int(i)).strip("<|>") for i in ids.view(-1).tolist()]

"""The `echo` diagnostic variant: no model, returns its input; measures the pipeline alone."""

from __future__ import annotations

import time
from collections.abc import Sequence

from workers.shared.base import CancelCheck, Request, Result


def request_text(request: Request) -> str:
    if request.prompt is not None:
        return request.prompt
    parts = []
    for message in request.messages or []:
        content = message["content"]
        parts.append(content if isinstance(content, str) else "".join(p.get("text", "") for p in content))
    return parts[-1] if parts else ""


class EchoEngine:
    def __init__(self, name: str, max_batch_size: int, delay_s: float = 0.0) -> None:
        self.name = name
        self.device = "none"
        self.max_batch_size = max_batch_size
        self.delay_s = delay_s  # each batch takes this long (a variant's `echo_delay_ms`)

    def warmup(self) -> None:
        return None

    def generate(self, batch: Sequence[Request], cancelled: CancelCheck) -> list[Result | Exception]:
        start = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        out: list[Result | Exception] = []
        for request in batch:
            words = request_text(request).split(" ")
            kept = words[: request.params.max_new_tokens]
            out.append(
                Result(
                    text=" ".join(kept),
                    finish_reason="length" if len(kept) < len(words) else "stop",
                    input_tokens=len(words),
                    output_tokens=len(kept),
                    time_to_first_token_ms=(time.monotonic() - request.started) * 1000,
                    inference_ms=(time.perf_counter() - start) * 1000,
                    batch_size=len(batch),
                )
            )
        return out

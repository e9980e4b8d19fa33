"""Per-row decoding controls, so jobs with different params share one batched `generate`.

`generate` runs greedy; `RowSampler` turns each row's scores into a one-hot choice
made with that row's own temperature, top-k, top-p, repetition penalty and seeded
generator — so a job's output depends on its seed, not on its batch mates.
`RowStopper` ends each row at its own `max_new_tokens`, stop strings or cancel flag.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from core.schemas import GenerationParams


def needs_sampler(params: Sequence[GenerationParams]) -> bool:
    return any(p.temperature > 0 or p.repetition_penalty != 1.0 for p in params)


def sample_row(
    scores: torch.Tensor, params: GenerationParams, generator: torch.Generator, seen: torch.Tensor | None
) -> int:
    """One row's next token from its float scores: repetition penalty over the `seen` ids, then
    greedy, or temperature, top-k and top-p and a draw from the row's own generator."""
    if params.repetition_penalty != 1.0 and seen is not None:
        penalty = params.repetition_penalty
        old = scores.gather(0, seen)
        scores = scores.scatter(0, seen, torch.where(old < 0, old * penalty, old / penalty))
    if params.temperature == 0:
        return int(scores.argmax())
    logits = scores / max(params.temperature, 1e-5)
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(dim=-1)
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[0])


class RowSampler(LogitsProcessor):  # type: ignore[misc]
    def __init__(self, params: Sequence[GenerationParams], device: torch.device) -> None:
        self.params = list(params)
        self.generators = []
        for p in params:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            self.generators.append(g)

    def __call__(self, input_ids: torch.LongTensor, raw_scores: torch.FloatTensor) -> torch.FloatTensor:
        scores: torch.Tensor = raw_scores.float()
        chosen = torch.argmax(scores, dim=-1)
        for row, p in enumerate(self.params):
            if p.temperature > 0 or p.repetition_penalty != 1.0:
                chosen[row] = sample_row(scores[row], p, self.generators[row], input_ids[row])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(1), 0.0)
        return out  # type: ignore[return-value]


class RowStopper(StoppingCriteria):  # type: ignore[misc]
    """Called once per decoding step for the whole batch; returns which rows are done."""

    def __init__(
        self,
        *,
        prompt_len: int | None,
        max_new_tokens: Sequence[int],
        stops: Sequence[Sequence[str]],
        decode: Callable[[list[int]], str],
        job_ids: Sequence[str],
        cancelled: Callable[[Sequence[str]], list[float | None]],
        eos_ids: Sequence[int],
    ) -> None:
        # None: taken from the first call (encoder-decoder models start from a forced prefix).
        self.prompt_len = prompt_len
        self.max_new = list(max_new_tokens)
        self.stops = [list(s) for s in stops]
        self.decode = decode
        self.job_ids = list(job_ids)
        self.cancelled_check = cancelled
        self.eos_ids = set(eos_ids)
        self.steps = 0
        self.first_token_at: float | None = None
        self.cancelled = [False] * len(job_ids)
        self.cancel_lag: list[int | None] = [None] * len(job_ids)
        self._step_times: list[float] = []  # wall clock of each step, to measure the cancel lag
        self.done = [False] * len(job_ids)
        # Tokens each row had generated when it was stopped here (None: eos or still open).
        self.lengths: list[int | None] = [None] * len(job_ids)
        self.finished_at: list[float | None] = [None] * len(job_ids)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        self.steps += 1
        now = time.monotonic()
        self._step_times.append(time.time())
        if self.first_token_at is None:
            self.first_token_at = now
        if self.prompt_len is None:
            self.prompt_len = int(input_ids.shape[1]) - 1
        generated = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        for i in range(len(self.done)):
            if not self.done[i] and last[i] in self.eos_ids:  # generate ends this row itself
                self.done[i], self.finished_at[i] = True, now
        open_rows = [i for i, d in enumerate(self.done) if not d]
        if open_rows:  # every step: one MGET, so a cancel stops the row at the next step
            flags = self.cancelled_check([self.job_ids[i] for i in open_rows])
            for i, requested in zip(open_rows, flags, strict=True):
                if requested is not None:
                    self.cancelled[i] = True
                    self.cancel_lag[i] = sum(1 for t in self._step_times if t >= requested)
                    self._stop(i, generated, now)
        for i, limit in enumerate(self.max_new):
            if self.done[i]:
                continue
            if generated >= limit:
                self._stop(i, generated, now)
            elif self.stops[i]:
                longest = max(len(s) for s in self.stops[i])
                tail = self.decode(input_ids[i, -min(generated, longest + 8) :].tolist())
                if any(s in tail for s in self.stops[i]):
                    self._stop(i, generated, now)
        return torch.tensor(self.done, device=input_ids.device)  # type: ignore[return-value]

    def timings(self, row: int, *, started: float, start: float, end: float) -> tuple[float | None, float]:
        """A row's time to first token (from when its job was taken) and its own time in the batch (ms)."""
        first = self.first_token_at
        ttft = (first - started) * 1000 if first and started else None
        return ttft, ((self.finished_at[row] or end) - start) * 1000

    def _stop(self, row: int, generated: int, now: float) -> None:
        self.done[row], self.lengths[row], self.finished_at[row] = True, generated, now

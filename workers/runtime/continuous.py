"""Continuous batching for decoder-only text models: rows join and leave between decoding steps.

A static batch runs until its longest member is done, so with mixed `max_new_tokens` most rows
sit finished while the batch goes on. Here a finished row leaves at once and a waiting request
takes its slot at the next step:

- `join` prefills the newcomers on their own (left-padded; a request sent again after its
  engine died is prefilled with the tokens it had generated, and goes on from them) and
  splices their key/value cache into the running one, both left-padded to one length; a 2-D
  attention mask marks the padding and each row carries its own position ids, so RoPE and the
  masks see every row as if alone.
- `step` feeds every row its last token, picks each row's next token (greedy, or sampled with
  the row's own seeded generator), and returns the rows that are done (eos, `max_new_tokens`,
  a stop string or a cancel, checked with one MGET per step).
- leaving rows are cut out of the cache, and columns that have become padding for every row
  are trimmed, so the cache never outgrows its longest live row by much.
- a row with a grammar (structured outputs: workers.runtime.constrain) has the tokens its
  grammar forbids masked before its token is picked, and ends when the grammar is complete.
- each row's new text is put in `deltas` (job id, text) at most every `DELTA_EVERY_S` and when
  it ends, for the batcher to publish: held back while a stop string may be forming, so the
  deltas of a job, joined, are its result's text.

The cache is a `DynamicCache` of full layers: sliding-window layers get their window from the
mask (in cache positions, as `generate` does with left padding).
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from transformers import DynamicCache

from workers.runtime.base import CancelCheck, Engine, Request, Result
from workers.runtime.constrain import mask_rows
from workers.runtime.generation import Decoder, peak_memory
from workers.runtime.sampling import sample_row

STEP_HISTORY = 256  # step times kept to measure a cancel's lag in steps
DELTA_EVERY_S = 0.05  # a row's new text is published at most this often while it runs


@runtime_checkable
class ContinuousEngine(Engine, Protocol):
    """An engine the batcher runs step by step (see workers.runtime.batcher)."""

    def encode(self, request: Request) -> list[int]: ...

    def stream(self) -> ContinuousDecoder: ...


@dataclass
class Row:
    key: object  # the caller's handle, returned with the row's result
    request: Request
    prompt: list[int]
    joined: float  # monotonic: prefill started
    joined_at: float  # wall clock of the same moment, for the cancel lag
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # generated so far
    first_token_at: float | None = None
    peak_rows: int = 0
    reason: str | None = None  # set when the row is done
    cancel_lag: int | None = None
    sent: str = ""  # its text published so far (a prefix of its result's text)
    sent_at: float = 0.0  # monotonic


class ContinuousDecoder:
    def __init__(self, decoder: Decoder, *, max_rows: int) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.device = decoder.device
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self._step_times: collections.deque[float] = collections.deque(maxlen=STEP_HISTORY)
        self.deltas: list[tuple[str, str]] = []  # (job id, new text), taken by the batcher
        # job id → the tokens a running row had generated at its last delta, taken with them
        self.progress: dict[str, list[int]] = {}

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    # ---- joining ---------------------------------------------------------------------------

    def join(self, entries: Sequence[tuple[object, Request, list[int]]]) -> list[tuple[object, Result]]:
        """Prefill (key, request, prompt ids) newcomers and add them to the running batch.
        Returns the rows that ended on their first token (a limit of one token, or eos)."""
        if not entries:
            return []
        now = time.monotonic()
        resumed = [self._resumed(request) for _, request, _ in entries]
        full = [ids + done for (_, _, ids), done in zip(entries, resumed, strict=True)]
        width = max(len(ids) for ids in full)
        input_ids = torch.full((len(entries), width), self.decoder.pad_id, dtype=torch.long)
        mask = torch.zeros((len(entries), width), dtype=torch.long)
        for i, ids in enumerate(full):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                cache_position=torch.arange(width, device=self.device),
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
        rows = [
            Row(
                key=key,
                request=request,
                prompt=ids,
                joined=now,
                joined_at=time.time(),
                generator=_generator(request, self.device),
                tokens=list(done),
            )
            for (key, request, ids), done in zip(entries, resumed, strict=True)
        ]
        self._splice(cache, mask, positions[:, -1] + 1, rows)
        return self._advance(logits, range(len(self.rows) - len(rows), len(self.rows)))

    def _resumed(self, request: Request) -> list[int]:
        """The tokens a re-sent request had generated (its limit and eos left out); its grammar,
        if it has one, follows them."""
        done = list(request.resume_tokens or [])[: max(0, request.params.max_new_tokens - 1)]
        end = next((i for i, t in enumerate(done) if t in self.decoder.eos_ids), len(done))
        if request.constraint is not None and end:
            request.constraint.matcher.consume_tokens(done[:end])
        return done[:end]

    def _splice(
        self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, rows: list[Row]
    ) -> None:
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.positions, self.rows = cache, mask, positions, rows
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)])
            old.values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)])
        self.mask = torch.cat([_pad_left(self.mask, length, dim=1), _pad_left(mask, length, dim=1)])
        self.positions = torch.cat([self.positions, positions])
        self.rows = self.rows + rows

    # ---- decoding --------------------------------------------------------------------------

    def step(self, cancelled: CancelCheck) -> list[tuple[object, Result]]:
        """One decoding step for every row; returns the rows that are done."""
        assert self.cache is not None and self.rows
        done = self._cancels(cancelled)
        if self.rows:
            last = torch.tensor([r.tokens[-1] for r in self.rows], dtype=torch.long, device=self.device)
            ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)
            self.mask = torch.cat([self.mask, ones], dim=1)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=last.unsqueeze(1),
                    attention_mask=self.mask,
                    position_ids=self.positions.unsqueeze(1),
                    cache=self.cache,
                    cache_position=torch.tensor([self.mask.shape[1] - 1], device=self.device),
                    use_cache=True,
                ).logits[:, -1, :]
            self.positions = self.positions + 1
            open_rows = [i for i, r in enumerate(self.rows) if r.reason is None]
            done += self._advance(logits, open_rows)
        self._step_times.append(time.time())
        return done

    def _cancels(self, cancelled: CancelCheck) -> list[tuple[object, Result]]:
        flags = cancelled([r.request.job_id for r in self.rows])
        for row, requested in zip(self.rows, flags, strict=True):
            if requested is not None and row.reason is None:
                row.reason = "cancelled"
                since = max(requested, row.joined_at)  # steps this row took part in
                row.cancel_lag = 1 + sum(1 for t in self._step_times if t >= since)
        return self._collect()

    def _advance(self, logits: torch.Tensor, indices: Sequence[int]) -> list[tuple[object, Result]]:
        """Pick each listed row's next token from its logits (in the same order)."""
        now = time.monotonic()
        scores = logits.float()
        constrained = [(n, c) for n, i in enumerate(indices) if (c := self.rows[i].request.constraint)]
        if constrained:  # what their grammars forbid is -inf
            with torch.inference_mode():
                mask_rows(scores, constrained)
        greedy = scores.argmax(dim=-1).tolist()
        size = len(self.rows)
        for n, i in enumerate(indices):
            row = self.rows[i]
            params = row.request.params
            token = greedy[n]
            if row.generator is not None:
                seen = None  # the ids so far, built only for a repetition penalty
                if params.repetition_penalty != 1.0:
                    seen = torch.tensor(row.prompt + row.tokens, device=scores.device)
                token = sample_row(scores[n], params, row.generator, seen)
            row.tokens.append(token)
            row.first_token_at = row.first_token_at or now
            row.peak_rows = max(row.peak_rows, size)
            constraint = row.request.constraint
            # eos, or the grammar complete (it takes nothing more)
            if token in self.decoder.eos_ids or (constraint is not None and constraint.accept(token)):
                row.reason = "stop"
            elif len(row.tokens) >= params.max_new_tokens:
                row.reason = "length"
            elif params.stop:
                longest = max(len(s) for s in params.stop)
                tail = self.decoder.decode(row.tokens[-(longest + 8) :])
                if any(s in tail for s in params.stop):
                    row.reason = "stop"
            if row.reason is None and now - row.sent_at >= DELTA_EVERY_S:
                self._send(row, self._settled_text(row), now)
        return self._collect()

    def _settled_text(self, row: Row) -> str:
        """The row's text so far that its result will surely start with."""
        text = self.decoder.decode(row.tokens)
        stops = row.request.params.stop
        if stops:
            hold = max(len(s) for s in stops) - 1  # a stop string may be forming at the end
            text = text[: max(0, len(text) - hold)]
        return text.rstrip("\ufffd")  # an incomplete UTF-8 sequence, completed by later tokens

    def _send(self, row: Row, text: str, now: float) -> None:
        if len(text) > len(row.sent) and text.startswith(row.sent):
            self.deltas.append((row.request.job_id, text[len(row.sent) :]))
            row.sent = text
            if row.reason is None:
                self.progress[row.request.job_id] = list(row.tokens)
        row.sent_at = now

    def _collect(self) -> list[tuple[object, Result]]:
        """Take the done rows out of the batch (and their cache), as results."""
        keep = [i for i, r in enumerate(self.rows) if r.reason is None]
        if len(keep) == len(self.rows):
            return []
        end = time.monotonic()
        peak = peak_memory(self.device)
        finished = [(r.key, self._result(r, end, peak)) for r in self.rows if r.reason is not None]
        if not keep:
            self.abandon()
            if self.device.type == "cuda":  # peak memory is reported per busy spell
                torch.cuda.reset_peak_memory_stats(self.device)
            return finished
        assert self.cache is not None
        # Everything new is built before anything is replaced: a failure leaves the batch whole.
        index = torch.tensor(keep, device=self.device)
        mask, positions = self.mask[index], self.positions[index]
        live = mask.any(dim=0).nonzero()
        start = int(live[0]) if live.numel() else 0  # columns left of this are padding in every row
        layers = [(lay.keys[index, :, start:], lay.values[index, :, start:]) for lay in self.cache.layers]
        for layer, (keys, values) in zip(self.cache.layers, layers, strict=True):
            layer.keys, layer.values = keys, values
        self.mask, self.positions = mask[:, start:], positions
        self.rows = [self.rows[i] for i in keep]
        return finished

    def _result(self, row: Row, end: float, peak: int) -> Result:
        tokens = [t for t in row.tokens if t not in self.decoder.eos_ids]
        text, reason, n_out = self.decoder.finish_row(tokens, row.request, row.reason == "cancelled")
        if row.reason == "stop":  # eos (taken out above), a stop string, or a complete grammar
            reason = "stop"
        self._send(row, text, end)
        started = row.request.started
        return Result(
            text=text,
            finish_reason=reason,
            input_tokens=len(row.prompt),
            output_tokens=n_out,
            time_to_first_token_ms=(row.first_token_at - started) * 1000
            if row.first_token_at and started
            else None,
            inference_ms=(end - row.joined) * 1000,
            batch_size=max(row.peak_rows, 1),
            peak_memory_bytes=peak,
            cancel_lag_steps=row.cancel_lag,
            grammar_compile_ms=constraint.compile_ms if (constraint := row.request.constraint) else None,
            grammar_mask_ms=constraint.mask_ms() if constraint else None,
            # its grammar hit a resource limit mid-reply: the job fails rather than end in a
            # reply that does not parse
            error=f"the reply's grammar stopped: {constraint.error()}"
            if constraint and constraint.error()
            else None,
        )

    def abandon(self) -> list[object]:
        """Drop every row (after an error); returns their keys."""
        keys = [r.key for r in self.rows]
        self.rows, self.cache = [], None
        self.mask, self.positions = self.mask[:0, :0], self.positions[:0]
        return keys


def _pad_left(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _generator(request: Request, device: torch.device) -> torch.Generator | None:
    params = request.params
    if params.temperature == 0 and params.repetition_penalty == 1.0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator

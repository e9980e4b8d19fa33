"""Continuous batching for decoder-only text models over a paged KV cache: rows join and leave
between steps, long prompts are prefilled in chunks between the other rows' tokens.

- `join` takes newcomers into the batch (a request sent again after its engine died brings the
  tokens it had generated, and goes on from them); it computes nothing.
- `step` runs one forward over every row's next tokens, packed without padding
  (workers.engine.kv): each decoding row brings its last token, and rows still prefilling bring
  the next chunk of their prompt, `chunk` tokens a step in all, so that a long prompt costs the
  running rows a little each step rather than a long stall. A row whose prefill is complete, and
  every decoding row, picks its next token (greedy, or sampled with the row's own seeded
  generator; a row with a grammar has what it forbids masked first). Rows that are done (eos,
  `max_new_tokens`, a stop string, a complete grammar, a cancel: one MGET a step) leave at once
  and their blocks go back to the pool.
- memory: a row is let in when the blocks for its whole sequence are free; when a decoding row
  needs a block and none is, the newest row is preempted (its blocks freed; its tokens, grammar
  matcher, generator and published text kept) and prefilled again from its tokens when blocks
  free up. A prompt the pool can never hold is refused, naming the limit.
- adapters: a row whose request names a LoRA adapter runs through it, beside rows of other
  adapters and of none, in the same packed forward (workers.engine.lora); its adapter is put on
  the device when it joins.
- a step that raises is run again in halves until the rows that raise are found: they fail, the
  others go on (their cache is rewritten where the failed step had half written it). An error
  the device cannot recover from (CUDA, other than out of memory) is raised to the batcher.
- each row's new text is put in `deltas` (job id, text) for the batcher to publish: its first
  text at once, then every row's together every `DELTA_EVERY_S`, and a row's last when it ends;
  held back while a stop string may be forming, so the deltas of a job, joined, are its result's
  text.
"""

from __future__ import annotations

import collections
import itertools
import secrets
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from core.variants import PREFILL_CHUNK
from workers.engine import kv
from workers.engine.constrain import StepMasks
from workers.engine.generation import Decoder, peak_memory
from workers.engine.lora import Adapter, Adapters
from workers.engine.sampling import sample_row
from workers.shared.base import CancelCheck, Engine, Request, RequestError, Result

STEP_HISTORY = 256  # step times kept to measure a cancel's lag in steps
# Running rows' new text is published together this often. Each message wakes the shell and
# Redis, and on a CPU that the engine's threads fill, every wake-up stalls a step: 50 ms made
# bench/throughput.py's system 10-20% slower than 250 ms (one session's runs).
DELTA_EVERY_S = 0.2
# Defaults for a decoder built without an engine's settings (tests, benches).
DEFAULT_KV_MB = 256
DEFAULT_BLOCK = 32

Outcome = tuple[object, Result | Exception]


@runtime_checkable
class ContinuousEngine(Engine, Protocol):
    """An engine the batcher runs step by step (see workers.engine.batcher)."""

    def ready(self, request: Request) -> bool:
        """Whether `request` may join now (its grammar may still be compiling, off the step path)."""
        ...

    def encode(self, request: Request) -> list[int]: ...

    def continuous(self, request: Request) -> bool:
        """Whether `request` joins the continuous batch (else: a static batch between steps)."""
        ...

    def stream(self) -> ContinuousDecoder: ...


@dataclass
class Row:
    key: object  # the caller's handle, returned with the row's result
    request: Request
    prompt: list[int]
    order: int  # join order: rows are let in, and preempted (newest first), by it
    joined: float  # monotonic: joined the batch
    joined_at: float  # wall clock of the same moment, for the cancel lag
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # generated so far
    tables: kv.Tables | None = None  # its blocks; None while it waits for them
    computed: int = 0  # tokens of prompt + tokens in the cache
    first_token_at: float | None = None
    peak_rows: int = 0
    preempted: int = 0
    reason: str | None = None  # set when the row is done
    error: Exception | None = None  # its step failed
    cancel_lag: int | None = None
    sent: str = ""  # its text published so far (a prefix of its result's text)
    adapter: Adapter | None = None  # its LoRA adapter, on the device (workers.engine.lora)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)

    def token_at(self, position: int) -> int:
        n = len(self.prompt)
        return self.prompt[position] if position < n else self.tokens[position - n]


def fatal(exc: BaseException) -> bool:
    """An error after which the device cannot be trusted: the engine restarts (workers.engine).
    Out of memory is not one: the step is retried in parts."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    return (accelerator is not None and isinstance(exc, accelerator)) or "CUDA error" in str(exc)


class ContinuousDecoder:
    def __init__(
        self,
        decoder: Decoder,
        *,
        max_rows: int,
        pool: kv.KVPool | None = None,
        kv_budget_mb: int | None = None,
        chunk: int | None = None,
        block: int = DEFAULT_BLOCK,
        adapters: Adapters | None = None,
    ) -> None:
        self.decoder = decoder
        self.adapters = adapters
        self.model = decoder.model
        self.device = decoder.device
        self.max_rows = max_rows
        self.body, self.head, self.text_config = language_model(decoder.model)
        self.layer_types = sorted(set(getattr(self.text_config, "layer_types", None) or ["full_attention"]))
        # Gemma 4 runs its KV-shared layers on the last `logits_to_keep` tokens of the sequence
        # only; a step's sequence is many rows, whose last tokens are not together at its end.
        self._body_args: dict[str, Any] = (
            {"logits_to_keep": slice(None)} if hasattr(self.body, "_maybe_slice_kv_shared_inputs") else {}
        )
        if pool is None:
            pool = kv.make_pool(
                decoder.model,
                kv.KVConfig(
                    budget_mb=kv_budget_mb or DEFAULT_KV_MB,
                    block=block,
                    chunk=chunk or PREFILL_CHUNK.get(self.device.type, PREFILL_CHUNK["cpu"]),
                ),
                max_rows=max_rows,
                device=self.device,
            )
        pool.reset()
        self.pool = pool
        self.chunk = pool.chunk
        self.rows: list[Row] = []  # every row in hand, in join order; those with tables are let in
        self._order = itertools.count()
        self._step_times: collections.deque[float] = collections.deque(maxlen=STEP_HISTORY)
        self.deltas: list[tuple[str, str]] = []  # (job id, new text), taken by the batcher
        # job id → the tokens a running row had generated at its last delta, taken with them
        self.progress: dict[str, tuple[int, list[int]]] = {}  # job id → (prompt tokens, generated)
        self.preemptions = 0
        self._deltas_at = 0.0  # monotonic: the running rows' text was last taken

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    # ---- joining ---------------------------------------------------------------------------

    def join(self, entries: Sequence[tuple[object, Request, list[int]]]) -> list[Outcome]:
        """Take (key, request, prompt ids) newcomers into the batch; their prefill runs in the
        steps that follow. Returns the ones refused (a sequence the cache can never hold)."""
        now, wall = time.monotonic(), time.time()
        refused: list[Outcome] = []
        for key, request, ids in entries:
            done = self._resumed(request)
            if len(ids) + len(done) + 1 > self.pool.capacity_tokens:
                refused.append((key, RequestError(
                    f"input is {len(ids) + len(done)} tokens; this engine's KV cache holds at most "
                    f"{self.pool.capacity_tokens - 1} tokens for one request"
                )))  # fmt: skip
                continue
            try:
                adapter = self._adapter(request)
            except RequestError as exc:
                refused.append((key, exc))
                continue
            self.rows.append(
                Row(
                    key=key,
                    request=request,
                    prompt=list(ids),
                    order=next(self._order),
                    joined=now,
                    joined_at=wall,
                    generator=_generator(request, self.device),
                    tokens=list(done),
                    adapter=adapter,
                )
            )
        return refused

    def _adapter(self, request: Request) -> Adapter | None:
        """The request's adapter on the device (copied there now if it is not yet)."""
        if request.adapter is None:
            return None
        if self.adapters is None:
            raise RequestError("this variant takes no adapters")
        in_use = {r.adapter.id for r in self.rows if r.adapter is not None}
        return self.adapters.take(request.adapter, in_use)

    def _resumed(self, request: Request) -> list[int]:
        """The tokens a re-sent request had generated (its limit and eos left out); its grammar,
        if it has one, follows them."""
        done = list(request.resume_tokens or [])[: max(0, request.params.max_new_tokens - 1)]
        end = next((i for i, t in enumerate(done) if t in self.decoder.eos_ids), len(done))
        if request.constraint is not None and end:
            request.constraint.matcher.consume_tokens(done[:end])
        return done[:end]

    # ---- decoding --------------------------------------------------------------------------

    def step(self, cancelled: CancelCheck) -> list[Outcome]:
        """One forward over every row's next tokens; returns the rows that are done."""
        done = self._cancels(cancelled)
        spans = self._schedule()
        if spans:
            outcomes = self._run(spans)
            picking: list[tuple[Row, torch.Tensor]] = []
            for row, count in spans:
                outcome = outcomes[id(row)]
                if isinstance(outcome, Exception):
                    row.reason, row.error = "error", outcome
                    continue
                row.computed += count
                assert row.tables is not None
                kv.slide(self.pool, row.tables, row.computed)
                if outcome is not None:
                    picking.append((row, outcome))
            done += self._advance(picking)
        self._step_times.append(time.time())
        return done + self._collect()

    def _schedule(self) -> list[tuple[Row, int]]:
        """This step's (row, tokens): every decoding row's last token, then prefill chunks, up to
        `chunk` tokens in all, to the rows with the least prompt left first (a short prompt
        never waits behind a long one's prefill: one tenant's long document does not decide
        another's first token). Waiting rows are let in, first come first in, when their blocks
        fit; the newest rows are preempted when a decoding row needs a block no one has free."""
        spans: list[tuple[Row, int]] = []
        prefilling: list[Row] = []
        closed = False  # a row waits for blocks: the rows behind it wait too
        for row in sorted(self.rows, key=lambda r: r.order):
            if row.reason is not None:
                continue
            if row.tables is None and (closed or not self._let_in(row)):
                closed = True
                continue
            if row.length - row.computed > 1:
                prefilling.append(row)
                continue
            fits, preempted = self._room(row, 1)
            closed = closed or preempted  # a row preempted now is not let in again this step
            if fits:
                spans.append((row, 1))
        budget = self.chunk
        for row in sorted(prefilling, key=lambda r: (r.length - r.computed, r.order)):
            if budget <= 0:
                break
            if row.tables is None or row.reason is not None:
                continue  # preempted above
            count = min(row.length - row.computed, budget)
            if self._room(row, count, preempt=False)[0]:
                spans.append((row, count))
                budget -= count
        return spans

    def _room(self, row: Row, count: int, *, preempt: bool = True) -> tuple[bool, bool]:
        """Blocks for the row's next `count` tokens: (whether it has them, whether a row was
        preempted for them). The newest row goes first, this one included; a row alone that the
        pool cannot hold any longer ends at its length."""
        assert row.tables is not None
        preempted = False
        while True:
            try:
                kv.ensure(self.pool, row.tables, row.computed + count, row.computed)
                return True, preempted
            except kv.OutOfBlocks:
                if not preempt:
                    return False, preempted
                holding = [r for r in self.rows if r.tables is not None]
                victim = max(holding, key=lambda r: r.order)
                if victim is row and len(holding) == 1:
                    row.reason = "length"  # alone, and the pool holds no more of it
                    return False, preempted
                self._preempt(victim)
                preempted = True
                if victim is row:
                    return False, preempted

    def _let_in(self, row: Row) -> bool:
        """Give `row` the blocks of its whole sequence, if they are free (one spare for each row
        already in, so that decoding rows rarely preempt a row just let in)."""
        need = self.pool.blocks_for(row.length + 1)
        spare = sum(1 for r in self.rows if r.tables is not None)
        if need + spare > self.pool.free():
            return False
        row.tables, row.computed = kv.Tables(), 0
        row.tables.full = self.pool.take(kv.FULL, self.pool.blocks_for(row.length))
        return True

    def _preempt(self, row: Row) -> None:
        assert row.tables is not None
        row.tables.release(self.pool)
        row.tables, row.computed = None, 0
        row.preempted += 1
        self.preemptions += 1

    def _run(self, spans: list[tuple[Row, int]]) -> dict[int, torch.Tensor | Exception | None]:
        """The step's forward; where it raises, its halves, until the rows that raise are found.
        Maps each row (by id) to its logits (None: mid-prefill) or the error of its part."""
        try:
            return self._forward(spans)
        except Exception as exc:
            if fatal(exc):
                raise
            if len(spans) == 1:
                return {id(spans[0][0]): exc}
            half = len(spans) // 2
            return {**self._run(spans[:half]), **self._run(spans[half:])}

    def _forward(self, spans: list[tuple[Row, int]]) -> dict[int, torch.Tensor | Exception | None]:
        ids: list[int] = []
        positions: list[int] = []
        parts: list[kv.Span] = []
        ends: list[int] = []  # index of the last token of each span that completes its row
        for row, count in spans:
            assert row.tables is not None
            start = row.computed
            ids.extend(row.token_at(p) for p in range(start, start + count))
            positions.extend(range(start, start + count))
            parts.append(kv.Span(row.tables, start, count))
            if start + count == row.length:
                ends.append(len(ids) - 1)
        plan = kv.StepPlan(self.pool, parts)
        lora = self.adapters.step([(r.adapter, n) for r, n in spans]) if self.adapters else nullcontext()
        with torch.inference_mode(), lora:
            hidden = self.body(
                input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                position_ids=torch.tensor([positions], dtype=torch.long, device=self.device),
                attention_mask=dict.fromkeys(self.layer_types, plan),
                use_cache=False,
                **self._body_args,
            ).last_hidden_state[0]
            logits = self.head(hidden[torch.tensor(ends, dtype=torch.long, device=self.device)])
            softcap = getattr(self.text_config, "final_logit_softcapping", None)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
        out: dict[int, torch.Tensor | Exception | None] = {}
        n = 0
        for row, count in spans:
            if row.computed + count == row.length:
                out[id(row)] = logits[n]
                n += 1
            else:
                out[id(row)] = None
        return out

    def _cancels(self, cancelled: CancelCheck) -> list[Outcome]:
        if not self.rows:
            return []
        flags = cancelled([r.request.job_id for r in self.rows])
        for row, requested in zip(self.rows, flags, strict=True):
            if requested is not None and row.reason is None:
                row.reason = "cancelled"
                since = max(requested, row.joined_at)  # steps this row took part in
                row.cancel_lag = 1 + sum(1 for t in self._step_times if t >= since)
        return self._collect()

    def _advance(self, picking: list[tuple[Row, torch.Tensor]]) -> list[Outcome]:
        """Pick each row's next token from its logits."""
        if not picking:
            return []
        now = time.monotonic()
        logits = torch.stack([logits for _, logits in picking])
        # Greedy rows pick from the logits as they are (max takes the first of equal scores, as
        # argmax does), and so does a greedy row whose grammar allows its pick. Only rows with a
        # sampler, or whose grammar forbids their pick, get float scores (a whole-vocabulary
        # copy each), masked.
        greedy = logits.max(dim=-1).indices.tolist()
        held = [(n, c) for n, (row, _) in enumerate(picking) if (c := row.request.constraint) is not None]
        masks = StepMasks([c for _, c in held], logits.shape[-1]) if held else None
        mask_of = {n: k for k, (n, _) in enumerate(held)}
        special = [
            n
            for n, (row, _) in enumerate(picking)
            if row.generator
            or (masks is not None and n in mask_of and not masks.allows(mask_of[n], greedy[n]))
        ]
        scores: dict[int, torch.Tensor] = {}
        if special:
            floats = logits[special].float()
            scores = {n: floats[k] for k, n in enumerate(special)}
            if masks is not None:  # what their grammars forbid is pushed down
                with torch.inference_mode():
                    for k, n in enumerate(special):
                        if n in mask_of:
                            masks.apply(mask_of[n], floats[k])
                            greedy[n] = int(floats[k].argmax())
        size = sum(1 for r in self.rows if r.tables is not None)
        for n, (row, _) in enumerate(picking):
            params = row.request.params
            token = greedy[n]
            if row.generator is not None:
                seen = None  # the ids so far, built only for a repetition penalty
                if params.repetition_penalty != 1.0:
                    seen = torch.tensor(row.prompt + row.tokens, device=logits.device)
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
        if now - self._deltas_at >= DELTA_EVERY_S:
            self._deltas_at = now
            due = [row for row, _ in picking]
        else:  # a row's first text goes at once (a stream's first token)
            due = [row for row, _ in picking if not row.sent]
        for row in due:
            if row.reason is None:
                self._send(row, self._settled_text(row))
        return []

    def _settled_text(self, row: Row) -> str:
        """The row's text so far that its result will surely start with."""
        text = self.decoder.decode(row.tokens)
        stops = row.request.params.stop
        if stops:
            hold = max(len(s) for s in stops) - 1  # a stop string may be forming at the end
            text = text[: max(0, len(text) - hold)]
        return text.rstrip("\ufffd")  # an incomplete UTF-8 sequence, completed by later tokens

    def _send(self, row: Row, text: str) -> None:
        if len(text) > len(row.sent) and text.startswith(row.sent):
            self.deltas.append((row.request.job_id, text[len(row.sent) :]))
            row.sent = text
            if row.reason is None:
                self.progress[row.request.job_id] = (len(row.prompt), list(row.tokens))

    def _collect(self) -> list[Outcome]:
        """Take the done rows out of the batch, their blocks back to the pool."""
        if all(r.reason is None for r in self.rows):
            return []
        end = time.monotonic()
        peak = peak_memory(self.device)
        finished: list[Outcome] = []
        for row in self.rows:
            if row.reason is None:
                continue
            if row.tables is not None:
                row.tables.release(self.pool)
                row.tables = None
            finished.append((row.key, row.error or self._result(row, end, peak)))
        self.rows = [r for r in self.rows if r.reason is None]
        if not self.rows and self.device.type == "cuda":  # peak memory is reported per busy spell
            torch.cuda.reset_peak_memory_stats(self.device)
        return finished

    def _result(self, row: Row, end: float, peak: int) -> Result:
        tokens = [t for t in row.tokens if t not in self.decoder.eos_ids]
        text, reason, n_out = self.decoder.finish_row(tokens, row.request, row.reason == "cancelled")
        if row.reason == "stop":  # eos (taken out above), a stop string, or a complete grammar
            reason = "stop"
        self._send(row, text)
        started = row.request.started
        return Result(
            text=text,
            finish_reason=reason,
            input_tokens=len(row.prompt),  # once, however often it was prefilled
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
        self.rows = []
        self.pool.reset()
        return keys


def results_of(outcomes: Sequence[Outcome]) -> list[tuple[object, Result]]:
    """The (key, result) pairs of a join or a step, for callers that expect no failure (tests,
    benches): the first failure is raised."""
    results = []
    for key, outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
        results.append((key, outcome))
    return results


def language_model(model: Any) -> tuple[Any, Any, Any]:
    """The decoder stack, the output head and the text config of a causal LM, or of the language
    model inside a multimodal checkpoint; its attention goes through the paged cache."""
    config = kv.use_paged_attention(model)
    return model.get_decoder(), model.get_output_embeddings(), config


def _generator(request: Request, device: torch.device) -> torch.Generator | None:
    params = request.params
    if params.temperature == 0 and params.repetition_penalty == 1.0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator

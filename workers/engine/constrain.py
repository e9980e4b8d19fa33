"""Constrained decoding in the engine: a row's logits masked by its grammar at every step.

Each text engine has one `Grammars`: its tokenizer as llguidance reads it (built on first use)
and the grammars compiled against it, on a thread of their own, cached by hash, so that jobs
with one schema compile it once. A request gets a `Constraint`, its own copy of the compiled
matcher; the continuous decoder computes the constrained rows' masks before it picks their
tokens (`StepMasks`, all the rows of a step together), masks the scores of those whose best
token is forbidden, then feeds each row's token back (`accept`). Rows with different grammars,
or none, share one batch: each row's mask is its own.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from core import structured
from workers.shared.base import RequestError

CACHED_GRAMMARS = 256


class Constraint:
    """One row's grammar state: follows its tokens; `mask_rows` masks its scores."""

    def __init__(self, matcher: Any, compile_ms: float, eos_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.compile_ms = compile_ms
        self.eos_ids = list(eos_ids)
        self.mask_s = 0.0
        self.steps = 0

    def mask(self, scores: torch.Tensor) -> None:
        """This row's scores (1-D) masked in place."""
        mask_rows(scores.unsqueeze(0), [(0, self)])

    def accept(self, token: int) -> bool:
        """Follow the chosen token; True when the grammar is complete and takes nothing more."""
        self.matcher.consume_token(token)
        return bool(self.matcher.is_stopped() or self.matcher.is_error())

    def error(self) -> str:
        """Why the grammar stopped matching (a resource limit), or "" while it matches."""
        return str(self.matcher.get_error())[:300] if self.matcher.is_error() else ""

    def mask_ms(self) -> float | None:
        return self.mask_s * 1000 / self.steps if self.steps else None


_executor: Any = None
FORBIDDEN = -3e38  # added to a forbidden token's score: no softmax or argmax picks it


class StepMasks:
    """The masks of one step's constrained rows, one bit a token, computed side by side on
    llguidance's threads (the GIL released). Reading a bit is all a greedy row whose best token
    is allowed needs (`allows`): the best of all is then the best allowed. Only a row that
    samples, or whose best token is forbidden, has its mask unpacked and added to its scores
    (`apply`), a whole-vocabulary pass."""

    def __init__(self, rows: Sequence[Constraint], vocab: int) -> None:
        global _executor
        from llguidance import LLExecutor

        started = time.perf_counter()
        if _executor is None:
            _executor = LLExecutor()
        self.rows = list(rows)
        self.vocab = vocab
        words = (vocab + 31) // 32
        self.bits = torch.empty((len(rows), words), dtype=torch.int32)
        if rows:
            _executor.unsafe_compute_mask_ptr(
                [(c.matcher, k) for k, c in enumerate(rows)], self.bits.data_ptr(), words * 4, len(rows)
            )
        self._words = self.bits.numpy()
        share = (time.perf_counter() - started) / max(1, len(rows))
        for c in rows:
            c.mask_s += share
            c.steps += 1

    def allows(self, k: int, token: int) -> bool:
        """Whether row `k`'s grammar takes `token` next."""
        return bool((int(self._words[k, token >> 5]) >> (token & 31)) & 1)

    def apply(self, k: int, scores: torch.Tensor) -> None:
        """Push down, in place, the scores (1-D) row `k`'s grammar forbids: its bits unpacked
        and added as 0 or -3e38 (on this CPU an add runs about 3x faster than a masked fill).
        A row with nothing allowed (its grammar hit an error) may only end."""
        started = time.perf_counter()
        row = self._words[k : k + 1].view(np.uint8)
        allowed = np.unpackbits(row, axis=1, bitorder="little")[0, : self.vocab]
        bias = torch.from_numpy(allowed).to(torch.float32).sub_(1.0).mul_(-FORBIDDEN)
        if not self._words[k].any():
            bias[self.rows[k].eos_ids] = 0.0
        scores.add_(bias.to(scores.device))
        self.rows[k].mask_s += time.perf_counter() - started


def mask_rows(scores: torch.Tensor, rows: Sequence[tuple[int, Constraint]]) -> None:
    """Push down, in place, the scores each constrained row's grammar forbids next: `rows` are
    (index into `scores`, its constraint)."""
    masks = StepMasks([c for _, c in rows], scores.shape[-1])
    for k, (n, _) in enumerate(rows):
        masks.apply(k, scores[n])


class Grammars:
    """A text engine's compiled grammars, against its tokenizer. A grammar the engine has not
    seen compiles on a thread of its own (`ready` starts it), beside the steps of the rows
    already decoding, never between them; its request joins once it is compiled."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_ids)
        self._lltokenizer: Any = None
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        # Compiles started by `ready` and not yet taken by `constraint` (refusals stay here).
        self._compiling: collections.OrderedDict[str, Future[tuple[Any, float]]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def tokenizer(self) -> Any:
        """The tokenizer as llguidance reads it, built for the engine's first constrained request
        (on the grammars' thread): 3-4 s for a 262k vocabulary, with the GIL held throughout, so
        the running rows wait for it, once per engine. Not at load: once it exists, this CPU's
        decoding steps run about 8% slower (`bench/throughput.py`'s batch through the batcher,
        134 against 123 tok/s), and engines that never see a grammar should not pay that. A
        grammar's compile releases the GIL and takes milliseconds (the API refuses 250)."""
        with self._lock:
            if self._lltokenizer is None:
                import llguidance.hf

                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._lltokenizer

    def ready(self, grammar: str) -> bool:
        """Whether `grammar` is compiled, or refused: `constraint` answers at once. If it is not,
        its compile starts on the grammars' thread (once, however many requests ask)."""
        key = structured.key(grammar)
        with self._lock:
            if key in self._compiled:
                return True
            future = self._compiling.get(key)
            if future is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammars")
                future = self._compiling[key] = self._pool.submit(self._compile, grammar)
                while len(self._compiling) > CACHED_GRAMMARS:  # oldest first: refusals, mostly
                    self._compiling.popitem(last=False)
        return future.done()

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher for `grammar`, compiled once per grammar (here, unless `ready` started
        it); RequestError if it is refused."""
        key = structured.key(grammar)
        compile_ms = 0.0
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
            future = self._compiling.get(key)
        if compiled is None:
            compiled, compile_ms = future.result() if future is not None else self._compile(grammar)
            with self._lock:
                self._compiling.pop(key, None)
                self._compiled[key] = compiled
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return Constraint(compiled.deep_copy(), round(compile_ms, 3), self._eos)

    def _compile(self, grammar: str) -> tuple[Any, float]:
        from llguidance import LLMatcher

        tokenizer = self.tokenizer()
        started = time.perf_counter()
        compiled = LLMatcher(tokenizer, grammar, log_level=0, limits=structured.limits())
        if compiled.is_error():
            raise RequestError(f"the grammar could not be compiled: {compiled.get_error()[:300]}")
        return compiled, (time.perf_counter() - started) * 1000

"""Constrained decoding in the engine: a row's logits masked by its grammar at every step.

Each text engine has one `Grammars`: its tokenizer as llguidance reads it (built on first use)
and the grammars compiled against it, cached by hash, so that jobs with one schema compile it
once. A request gets a `Constraint`, its own copy of the compiled matcher; the continuous
decoder masks the constrained rows' scores before it picks their tokens (`mask_rows`, all the
rows of a step together), then feeds each row's token back (`accept`). Rows with different
grammars, or none, share one batch: each row's mask is its own.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
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


def mask_rows(scores: torch.Tensor, rows: Sequence[tuple[int, Constraint]]) -> None:
    """Push down, in place, the scores each constrained row's grammar forbids next: `rows` are
    (index into `scores`, its constraint). The masks are computed side by side on llguidance's
    threads, one bit a token, unpacked at once, and added to each row as 0 or -3e38 (on this
    CPU an add runs about 3x faster than a masked fill)."""
    global _executor
    if not rows:
        return
    from llguidance import LLExecutor

    started = time.perf_counter()
    if _executor is None:
        _executor = LLExecutor()
    vocab = scores.shape[-1]
    words = (vocab + 31) // 32
    bits = torch.empty((len(rows), words), dtype=torch.int32)
    _executor.unsafe_compute_mask_ptr(
        [(c.matcher, k) for k, (_, c) in enumerate(rows)], bits.data_ptr(), words * 4, len(rows)
    )
    allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    bias = torch.from_numpy(allowed).to(torch.float32).sub_(1.0).mul_(-FORBIDDEN)
    for k, (n, c) in enumerate(rows):
        if not bool(bits[k].any()):  # nothing allowed (the grammar hit an error): the reply ends
            bias[k, c.eos_ids] = 0.0
        scores[n].add_(bias[k].to(scores.device))
    share = (time.perf_counter() - started) / len(rows)
    for _, c in rows:
        c.mask_s += share
        c.steps += 1


class Grammars:
    """A text engine's compiled grammars, against its tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_ids)
        self._lltokenizer: Any = None
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        """The tokenizer as llguidance reads it, built when the engine's first constrained request
        joins: about 2.5 s for a 262k vocabulary, once per engine, with the GIL held throughout
        (so that request's batch waits for it once; engines that never see one never pay)."""
        with self._lock:
            if self._lltokenizer is None:
                import llguidance.hf

                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._lltokenizer

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher for `grammar`, compiled once per grammar; RequestError if it is refused."""
        from llguidance import LLMatcher

        tokenizer = self.tokenizer()
        key = structured.key(grammar)
        compile_ms = 0.0
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            started = time.perf_counter()
            compiled = LLMatcher(tokenizer, grammar, log_level=0, limits=structured.limits())
            compile_ms = (time.perf_counter() - started) * 1000
            if compiled.is_error():
                raise RequestError(f"the grammar could not be compiled: {compiled.get_error()[:300]}")
            with self._lock:
                self._compiled[key] = compiled
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return Constraint(compiled.deep_copy(), round(compile_ms, 3), self._eos)

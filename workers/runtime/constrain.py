"""Constrained decoding in the engine: a row's logits masked by its grammar at every step.

Each text engine has one `Grammars`: its tokenizer as llguidance reads it (built on first use)
and the grammars compiled against it, cached by hash, so that jobs with one schema compile it
once. A request gets a `Constraint`, its own copy of the compiled matcher; the continuous
decoder masks the row's scores before it picks a token (`mask`), then feeds the token back
(`accept`). Rows with different grammars, or none, share one batch: each row's mask is its own.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from core import structured
from workers.runtime.base import RequestError

CACHED_GRAMMARS = 256


class Constraint:
    """One row's grammar state: masks its scores, follows its tokens."""

    def __init__(self, matcher: Any, compile_ms: float, eos_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.compile_ms = compile_ms
        self.eos_ids = list(eos_ids)
        self.mask_s = 0.0
        self.steps = 0

    def mask(self, scores: torch.Tensor) -> None:
        """Set the scores of the tokens the grammar forbids next to -inf (in place, one row)."""
        started = time.perf_counter()
        bias = self.matcher.compute_logit_bias()  # one byte a token: 0 forbidden, 200 allowed
        allowed = torch.frombuffer(bytearray(bias), dtype=torch.uint8)[: scores.shape[-1]]
        forbidden = allowed == 0
        if bool(forbidden.all()):  # nothing is allowed (an error state): the reply ends
            forbidden[self.eos_ids] = False
        scores[: forbidden.shape[0]].masked_fill_(forbidden.to(scores.device), float("-inf"))
        if scores.shape[-1] > forbidden.shape[0]:  # the model's padding ids beyond the tokenizer's
            scores[forbidden.shape[0] :] = float("-inf")
        self.mask_s += time.perf_counter() - started
        self.steps += 1

    def accept(self, token: int) -> bool:
        """Follow the chosen token; True when the grammar is complete and takes nothing more."""
        self.matcher.consume_token(token)
        return bool(self.matcher.is_stopped() or self.matcher.is_error())

    def mask_ms(self) -> float | None:
        return self.mask_s * 1000 / self.steps if self.steps else None


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
        """The tokenizer as llguidance reads it (a few seconds for a 262k vocabulary, once)."""
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

"""A decoder-only model's tokenizer-side setup and its replies, shared by the text and multimodal
engines.

`Decoder` holds what both need: the stop ids (eos and Gemma's end of turn), the pad id, a neutral
generation config, and `finish_row` — a row's tokens made into its reply's text and finish
reason. Text jobs are decoded step by step by the continuous decoder (workers.engine.continuous),
which uses these; `Decoder.run` is the multimodal engine's static batch: one left-padded
`generate`, each row keeping its own sampling, limits, stop strings and cancel flag (see
sampling.py), and coming back as its own Result.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from workers.engine.sampling import RowSampler, RowStopper, needs_sampler
from workers.shared.base import CancelCheck, FinishReason, Request, Result

END_OF_TURN = "<end_of_turn>"
# Gemma 2 / 3 / 3n end a turn with <end_of_turn>, Gemma 4 with <turn|> (the same id, 106).
END_OF_TURNS = (END_OF_TURN, "<turn|>")


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS


def stop_ids(tokenizer: Any) -> list[int]:
    """eos and Gemma's end-of-turn (whichever its tokenizer names): either ends a reply."""
    ids = {tokenizer.eos_token_id}
    for name in END_OF_TURNS:
        end_of_turn = tokenizer.convert_tokens_to_ids(name)
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def neutral_generation_config(model: Any, tokenizer: Any, eos_ids: list[int], pad_id: int) -> None:
    """generate() fills unset fields from the model's own generation_config (a checkpoint may ship a
    repetition penalty or sampling defaults); jobs carry their own params instead."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=pad_id
    )


class Decoder:
    def __init__(self, *, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = stop_ids(tokenizer)
        neutral_generation_config(model, tokenizer, self.eos_ids, self.pad_id)

    def decode(self, ids: list[int]) -> str:
        # PostgreSQL cannot store NUL; the byte token <0x00> decodes to one.
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).replace("\x00", "\ufffd")

    def run(
        self,
        inputs: dict[str, torch.Tensor],
        batch: Sequence[Request],
        cancelled: CancelCheck,
        *,
        extra: Callable[[int], dict[str, Any]] | None = None,
    ) -> list[Result]:
        """Generate for left-padded `inputs` (input_ids, attention_mask, and any pixel/audio tensors)."""
        width = int(inputs["input_ids"].shape[1])
        attention = inputs["attention_mask"]
        params = [r.params for r in batch]
        stopper = RowStopper(
            prompt_len=width,
            max_new_tokens=[p.max_new_tokens for p in params],
            stops=[p.stop for p in params],
            decode=self.decode,
            job_ids=[r.job_id for r in batch],
            cancelled=cancelled,
            eos_ids=self.eos_ids,
        )
        processors = LogitsProcessorList()
        if needs_sampler(params):
            processors.append(RowSampler(params, self.device))
        config = GenerationConfig(
            max_new_tokens=max(p.max_new_tokens for p in params),
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.monotonic()
        with torch.inference_mode():
            output = self.model.generate(
                **{k: v.to(self.device) for k, v in inputs.items()},
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stopper]),
            )
        end = time.monotonic()
        peak = peak_memory(self.device)
        generated = output[:, width:].tolist()
        results = []
        for row, request in enumerate(batch):
            length = stopper.lengths[row]
            tokens = generated[row] if length is None else generated[row][:length]
            text, reason, n_out = self.finish_row(tokens, request, stopper.cancelled[row])
            ttft, inference_ms = stopper.timings(row, started=request.started, start=start, end=end)
            results.append(
                Result(
                    text=text,
                    finish_reason=reason,
                    input_tokens=int(attention[row].sum()),
                    output_tokens=n_out,
                    time_to_first_token_ms=ttft,
                    inference_ms=inference_ms,
                    batch_size=len(batch),
                    peak_memory_bytes=peak,
                    cancel_lag_steps=stopper.cancel_lag[row],
                    **(extra(row) if extra else {}),
                )
            )
        return results

    def finish_row(
        self, tokens: list[int], request: Request, cancelled: bool
    ) -> tuple[str, FinishReason, int]:
        limit = request.params.max_new_tokens
        reason: FinishReason = "length"
        kept: list[int] = []
        for token in tokens[:limit]:
            if token in self.eos_ids:
                reason = "stop"
                break
            kept.append(token)
        text = self.decode(kept)
        cut = min((text.find(s) for s in request.params.stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if cancelled:
            reason = "cancelled"
        return text, reason, len(kept)

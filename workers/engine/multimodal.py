"""Image and audio jobs on Gemma 3 (vision), Gemma 3n and Gemma 4 through their processors.

Each job's conversation, its images and audio clips decoded in place, goes through
`processor.apply_chat_template`; jobs with the same kinds of media share one padded
`generate` (a processor takes a batch only when every conversation has the same shape).

A variant that batches continuously (Gemma 3 4B-27B, Gemma 3n, Gemma 4) decodes its text-only
jobs in the continuous batch like any text model: its language model over the paged KV cache,
whose geometry follows the layers (Gemma 3n's and Gemma 4's KV-shared layers read the slots of the
layers they share; Gemma 4's full layers have heads of their own size). Jobs with media stay in
static batches, run between the continuous batch's steps: an image's tokens attend to each other
both ways (the causal mask of the paged path does not say so yet), and the vision and audio
towers' prefill has not joined the packed step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Unpack

import torch

from core.tool_calls import tool_prompt
from workers.engine.text import (
    DecodingEngine,
    EngineArgs,
    merge_turns,
    template_takes_tools,
    with_tool_prompt,
)
from workers.shared.base import CancelCheck, Request, RequestError, Result


def instruction(request: Request) -> str:
    """What to do with speech that comes with no words of the caller's."""
    params = request.params
    if params.audio_task == "translate":
        return f"Translate this speech into {params.target_language or 'English'}."
    source = f" It is in {params.language}." if params.language else ""
    return f"Transcribe this speech exactly.{source}"


def conversation(request: Request, tools_in_template: bool) -> list[dict[str, Any]]:
    messages = merge_turns(request.messages or [])
    if request.tools and not tools_in_template:
        messages = merge_turns(with_tool_prompt(messages, request.tools))
    out = []
    for message in messages:
        if message["role"] == "system":  # templates read a system turn's first text part only
            text = "".join(p.get("text", "") for p in message["content"])
            out.append({"role": "system", "content": [{"type": "text", "text": text}]})
            continue
        parts = [p for p in message["content"] if p.get("type") != "text" or p.get("text")]
        if any(p["type"] == "audio" for p in parts) and not any(p["type"] == "text" for p in parts):
            parts.append({"type": "text", "text": instruction(request)})
        out.append({"role": message["role"], "content": parts})
    return out


def shape(request: Request) -> tuple[str, int, int]:
    """Jobs batch together when their input has the same kind and number of media."""
    if request.prompt is not None:
        return ("prompt", 0, 0)
    return ("chat", request.images, request.audio_clips)


class ProcessorEngine(DecodingEngine):
    def __init__(self, *, processor: Any, **args: Unpack[EngineArgs]) -> None:
        processor.tokenizer.padding_side = "left"
        super().__init__(tokenizer=processor.tokenizer, **args)
        self.processor = processor
        if not getattr(processor, "chat_template", None):
            processor.chat_template = self.tokenizer.chat_template  # the tokenizer's, or Gemma's
        self.tools_in_template = template_takes_tools(processor.chat_template)

    def continuous(self, request: Request) -> bool:
        return self.pool is not None and not request.images and not request.audio_clips

    def warmup(self) -> None:
        from core.schemas import GenerationParams

        warm = Request(
            job_id="warmup", messages=None, prompt="Hello", params=GenerationParams(max_new_tokens=2)
        )
        self.generate([warm], lambda ids: [None] * len(ids))
        if self.pool is not None:
            self.warm_stream()

    def _inputs(self, batch: Sequence[Request]) -> dict[str, torch.Tensor]:
        if batch[0].prompt is not None:
            prompts = [(tool_prompt(r.tools) + "\n\n" if r.tools else "") + (r.prompt or "") for r in batch]
            encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        else:
            convs = [conversation(r, self.tools_in_template) for r in batch]
            kwargs: dict[str, Any] = {}
            tools = batch[0].tools
            if self.tools_in_template and tools and all(r.tools == tools for r in batch):
                kwargs["tools"] = [t.model_dump() for t in tools]
            encoded = self.processor.apply_chat_template(
                convs,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
                sanitize_control_tokens=True,  # "<image_soft_token>" typed by a user stays text
                **kwargs,
            )
        return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}

    def generate(self, batch: Sequence[Request], cancelled: CancelCheck) -> list[Result | Exception]:
        results: list[Result | Exception] = [RequestError("not run")] * len(batch)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, request in enumerate(batch):
            key: tuple[Any, ...] = shape(request)
            if request.tools and not self.tools_in_template:
                key = (*key, "tools")
            elif request.tools:
                key = (*key, tuple(t.model_dump_json() for t in request.tools))
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            group = [batch[i] for i in members]
            for i, outcome in zip(members, self._run(group, cancelled), strict=True):
                results[i] = outcome
        return results

    def _run(self, group: list[Request], cancelled: CancelCheck) -> list[Result | Exception]:
        start = time.perf_counter()
        try:
            inputs = self._inputs(group)
        except Exception as exc:
            if len(group) > 1:  # find the one the processor refuses; the others still run
                return [outcome for r in group for outcome in self._run([r], cancelled)]
            return [RequestError(f"the processor refused the input ({type(exc).__name__})")]
        prep_ms = (time.perf_counter() - start) * 1000
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        too_long = [n > self.max_input_tokens for n in lengths]
        if any(too_long):
            if len(group) == 1:
                return [self.too_long(lengths[0])]
            return [outcome for r in group for outcome in self._run([r], cancelled)]
        share = prep_ms / len(group)
        try:
            return list(
                self.decoder.run(inputs, group, cancelled, extra=lambda row: {"preprocess_ms": share})
            )
        except Exception as exc:
            if len(group) > 1:  # isolate the request that broke the batch
                return [outcome for r in group for outcome in self._run([r], cancelled)]
            return [RequestError(f"generation failed ({type(exc).__name__})")]

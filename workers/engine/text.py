"""Text generation on a Hugging Face causal LM: a job's prompt built from its messages (the chat
template, the tools offered), then decoded step by step by a continuous decoder
(workers.engine.continuous) over the engine's paged KV cache (workers.engine.kv), in the
worker's engine process — requests join the running batch and leave it between decoding steps
(workers.engine.batcher)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Required, TypedDict, Unpack

import torch

from core import structured
from core.tool_calls import tool_prompt
from core.variants import PREFILL_CHUNK
from workers.engine import kv
from workers.engine.constrain import Grammars
from workers.engine.continuous import ContinuousDecoder
from workers.engine.generation import Decoder
from workers.engine.lora import Adapters
from workers.shared.base import Request, RequestError

# Gemma's turn format, for tokenizers that ship without a template (the 270M GGUF's).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def template_takes_tools(template: Any) -> bool:
    return isinstance(template, str) and "tools" in template


def with_tool_prompt(
    messages: list[dict[str, Any]], tools: Sequence[Any], *, json_calls: bool = False
) -> list[dict[str, Any]]:
    """Offer the tools in the system turn: one plain string, the offer before the caller's own text
    (Gemma templates read a system turn's first text part only)."""
    offer = tool_prompt(tools, json_calls=json_calls)
    if messages and messages[0]["role"] == "system":
        own = "".join(p.get("text", "") for p in _parts(messages[0]["content"]))
        return [{"role": "system", "content": offer + "\n\n" + own}, *messages[1:]]
    return [{"role": "system", "content": offer}, *messages]


def merge_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive same-role messages joined into one turn (Gemma templates need alternation);
    adjacent text parts are joined too, as templates trim each part."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        parts = _parts(message["content"])
        if merged and merged[-1]["role"] == message["role"]:
            parts = [{"type": "text", "text": "\n\n"}, *parts]
            target = merged[-1]["content"]
        else:
            target = []
            merged.append({"role": message["role"], "content": target})
        for part in parts:
            if part.get("type") == "text" and target and target[-1].get("type") == "text":
                target[-1] = {"type": "text", "text": target[-1]["text"] + part["text"]}
            else:
                target.append(dict(part))
    return merged


def _parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def text_only(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Turns as plain strings, for text tokenizers' templates."""
    return [
        {"role": m["role"], "content": "".join(p.get("text", "") for p in _parts(m["content"]))}
        for m in messages
    ]


class EngineArgs(TypedDict, total=False):
    """What a `DecodingEngine` is built with, besides its tokenizer (or the processor that has it).
    `kv`: its paged KV cache, for the requests it decodes continuously (None: it decodes none)."""

    name: Required[str]
    model: Required[Any]
    device: Required[str]
    max_batch_size: Required[int]
    max_input_tokens: Required[int]
    kv: kv.KVConfig | None
    # The adapter cache of a continuous engine whose variant takes LoRA adapters (None: it takes none).
    adapter_cache_bytes: int | None


class DecodingEngine:
    """What the text and multimodal engines share: a Hugging Face model that a `Decoder` runs, its
    tokenizer (with Gemma's chat template where it ships none), a job's prompt ids and grammar,
    the engine's limits, and, when it decodes continuously, its KV pool: allocated once, here,
    so that the memory it takes is measured with the weights."""

    def __init__(self, *, tokenizer: Any, **args: Unpack[EngineArgs]) -> None:
        self.name = args["name"]
        self.device = args["device"]
        self.max_batch_size = args["max_batch_size"]
        self.max_input_tokens = args["max_input_tokens"]
        if not tokenizer.chat_template:
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        self.tokenizer = tokenizer
        model = args["model"]
        self.decoder = Decoder(model=model, tokenizer=tokenizer, device=torch.device(self.device))
        vocab = int(getattr(kv.text_config(model), "vocab_size", 0) or len(tokenizer))
        self.grammars = Grammars(tokenizer, vocab, self.decoder.eos_ids)
        config = args.get("kv")
        self.pool = (
            kv.make_pool(model, config, max_rows=self.max_batch_size, device=torch.device(self.device))
            if config is not None
            else None
        )
        self.kv_bytes = self.pool.bytes if self.pool is not None else 0
        budget = args.get("adapter_cache_bytes")
        self.adapters = (
            Adapters(
                model.get_decoder(),
                device=torch.device(self.device),
                dtype=model.get_input_embeddings().weight.dtype,
                budget_bytes=budget,
            )
            if budget and self.pool is not None
            else None
        )

    def too_long(self, tokens: int) -> RequestError:
        return RequestError(f"input is {tokens} tokens; {self.name} takes at most {self.max_input_tokens}")

    def ready(self, request: Request) -> bool:
        """Whether `request` may join now: its adapter, if it names one, is read, and it has no
        grammar, or its grammar is compiled (the read and the compile start, off the device's
        thread, at the first ask). An adapter or a grammar that cannot be read is ready: joining
        or `encode` refuses it."""
        if (
            request.adapter is not None
            and self.adapters is not None
            and not self.adapters.ready(request.adapter)
        ):
            return False
        try:
            grammar = self._grammar(request)
        except RequestError:
            return True
        return grammar is None or self.grammars.ready(grammar)

    def encode(self, request: Request) -> list[int]:
        """The request's prompt ids; a request whose reply is held to a grammar gets its matcher."""
        grammar = self._grammar(request)
        ids = self._prompt_ids(request)
        if grammar is not None:
            request.constraint = self.grammars.constraint(grammar)
        return ids

    @staticmethod
    def _grammar(request: Request) -> str | None:
        """The request's grammar, read once (`ready` asks for it at every look while it compiles)."""
        if not request.grammar_read:
            params = request.params
            try:
                request.grammar = structured.grammar_of(
                    params.response_format, params.tool_choice, request.tools
                )
            except structured.StructuredError as exc:
                raise RequestError(str(exc)) from exc
            request.grammar_read = True
        return request.grammar

    def _prompt_ids(self, request: Request) -> list[int]:
        choice = request.params.tool_choice
        tools = (request.tools or []) if choice != "none" else []
        json_calls = choice is not None  # constrained calls are JSON objects
        if request.prompt is not None:
            offer = tool_prompt(tools, json_calls=json_calls) if tools else ""
            prompt = (offer + "\n\n" + request.prompt) if tools else request.prompt
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            messages = merge_turns(request.messages or [])
            kwargs: dict[str, Any] = {}
            if tools and template_takes_tools(self.tokenizer.chat_template):
                kwargs["tools"] = [t.model_dump() for t in tools]
            elif tools:
                messages = merge_turns(with_tool_prompt(messages, tools, json_calls=json_calls))
            try:
                encoded = self.tokenizer.apply_chat_template(
                    text_only(messages),
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    sanitize_control_tokens=True,  # "<end_of_turn>" typed by a user stays text
                    **kwargs,
                )
            except Exception as exc:  # a template that refuses this conversation (jinja raise_exception)
                raise RequestError(f"the chat template refused the messages ({type(exc).__name__})") from exc
            ids = list(encoded["input_ids"])
        if len(ids) > self.max_input_tokens:
            raise self.too_long(len(ids))
        return ids

    def continuous(self, request: Request) -> bool:
        """Whether `request` decodes in the continuous batch (else in a static one)."""
        return self.pool is not None

    def stream(self) -> ContinuousDecoder:
        """A running batch that requests join and leave between steps (continuous batching)."""
        assert self.pool is not None, f"{self.name} has no KV cache: it decodes in static batches"
        return ContinuousDecoder(
            self.decoder, max_rows=self.max_batch_size, pool=self.pool, adapters=self.adapters
        )

    def warm_stream(self) -> None:
        """One short generation through the running-batch path, so the first real request does not
        pay for lazy initialisation."""
        from core.schemas import GenerationParams

        warm = Request(
            job_id="warmup", messages=None, prompt="Hello", params=GenerationParams(max_new_tokens=2)
        )
        stream = self.stream()
        stream.join([(None, warm, self.encode(warm))])
        while stream.rows:
            stream.step(lambda ids: [None] * len(ids))


class TextEngine(DecodingEngine):
    """A causal LM, run step by step by the continuous decoder (its variants' batching)."""

    def __init__(self, *, tokenizer: Any, **args: Unpack[EngineArgs]) -> None:
        if args.get("kv") is None:  # built without a variant's settings (tests, tools)
            device = torch.device(args["device"]).type
            args["kv"] = kv.KVConfig(budget_mb=None, chunk=PREFILL_CHUNK.get(device, PREFILL_CHUNK["cpu"]))
        super().__init__(tokenizer=tokenizer, **args)

    def warmup(self) -> None:
        self.warm_stream()

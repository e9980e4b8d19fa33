"""Where weights come from, and how a variant becomes a loaded engine.

Never downloads. Weights shipped in pip packages (the 270M GGUF, Whisper in CTranslate2
format) are converted once into the model cache, tiny test models are generated once
there; Hugging Face ids load from a mounted directory or the local HF cache, offline.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import torch
from filelock import FileLock

from core.variants import Variant, VariantRegistry, hf_snapshot, weights_problem
from workers.engine.echo import EchoEngine
from workers.engine.kv import KVConfig
from workers.engine.packing import native_on_cpu, pack_linears
from workers.engine.text import GEMMA_CHAT_TEMPLATE, TextEngine
from workers.shared.base import Engine

log = structlog.get_logger(__name__)

MARKER = "gemmaq-converted.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class WeightsUnavailable(Exception):
    """The variant's weights are not on this host; the worker reports it and goes on."""


def ensure_built(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """Run `build(staging)` once for `target`, under a file lock, and move the result into place."""
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        if (target / MARKER).is_file():
            return target
        start = time.perf_counter()
        log.info("variant.building", target=str(target), what=what)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        build(staging)
        (staging / MARKER).write_text(json.dumps({"what": what}))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        log.info("variant.built", target=str(target), seconds=round(time.perf_counter() - start, 1))
    return target


def convert_gguf(variant: Variant, cache_root: Path) -> Path:
    """The GGUF of a `gguf-package` variant as bf16 safetensors (~35 s once, then ~3 s loads)."""
    assert variant.package is not None
    package = importlib.import_module(variant.package)

    def build(staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        gguf: Path = package.assemble(cache_root / "gguf" / package.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **LOCAL)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            **LOCAL,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        # Dequantized, the model is plain bf16: drop the GGUF quantizer so it saves as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if not tokenizer.chat_template:
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        gguf.unlink(missing_ok=True)

    return ensure_built(cache_root / variant.name, build, f"convert {variant.package}")


def generate_tiny(variant: Variant, tokenizer_dir: Path, cache_root: Path) -> Path:
    from workers.engine.tiny_gemma4 import build_tiny_gemma4
    from workers.engine.tiny_models import build_tiny_gemma3_vision, build_tiny_gemma3n

    builders: dict[str, Callable[..., Path]] = {
        "gemma3-vision": build_tiny_gemma3_vision,
        "gemma3n": build_tiny_gemma3n,
        "gemma4": build_tiny_gemma4,
    }
    assert variant.builder is not None
    builder = builders[variant.builder]
    return ensure_built(
        cache_root / variant.name,
        lambda staging: _into(lambda out: builder(out, tokenizer_dir), staging),
        f"generate {variant.builder}",
    )


def convert_ct2(variant: Variant, cache_root: Path) -> Path:
    from workers.engine.whisper_ct2 import convert_ct2_whisper

    assert variant.ct2_model is not None
    source = variant.ct2_model
    return ensure_built(
        cache_root / variant.name,
        lambda staging: _into(lambda out: convert_ct2_whisper(source, out), staging),
        f"convert {source}",
    )


def _into(build: Callable[[Path], Path], staging: Path) -> None:
    """Builders write a fresh folder of their own; move its files into the staging folder."""
    out = staging.with_name(staging.name + ".conv")
    shutil.rmtree(out, ignore_errors=True)
    build(out)
    for item in out.iterdir():
        item.rename(staging / item.name)
    out.rmdir()


def weights_dir(variant: Variant, registry: VariantRegistry, cache_root: Path) -> Path:
    problem = weights_problem(variant, registry)
    if problem:
        raise WeightsUnavailable(problem)
    if variant.source == "gguf-package":
        return convert_gguf(variant, cache_root)
    if variant.source in ("cache", "generated"):
        assert variant.base is not None
        base = registry.get(variant.base)
        assert base is not None
        base_dir = convert_gguf(base, cache_root)
        return base_dir if variant.source == "cache" else generate_tiny(variant, base_dir, cache_root)
    if variant.source == "ct2-package":
        return convert_ct2(variant, cache_root)
    if variant.path is not None:
        return variant.path
    assert variant.hf_id is not None
    snapshot = hf_snapshot(variant.hf_id)
    if snapshot is None:
        raise WeightsUnavailable(f"weights for {variant.hf_id} are not in the Hugging Face cache")
    return snapshot


def quantization_config(variant: Variant) -> Any:
    if variant.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if variant.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


# Weights load from disk only, and never run code that ships beside them.
LOCAL = {"local_files_only": True, "trust_remote_code": False}


def load_dtype(variant: Variant, device: str) -> torch.dtype:
    """The dtype the variant's weights are loaded in: its own, except on a CPU with no native
    support for that half-precision type (then float32: twice the memory, many times the speed).
    Quantized variants keep theirs."""
    dtype = DTYPES[variant.dtype]
    if device == "cpu" and variant.quantization == "none" and not native_on_cpu(dtype):
        log.info("variant.cpu_dtype", variant=variant.name, configured=variant.dtype, used="float32")
        return torch.float32
    return dtype


def model_kwargs(variant: Variant, device: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": load_dtype(variant, device), **LOCAL}
    quant = quantization_config(variant)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    return kwargs


def place(model: Any, variant: Variant, device: str) -> Any:
    if variant.quantization == "none":
        model.to(device)
        if device == "cpu":
            pack_linears(model)
    return model.eval()


def load_engine(variant: Variant, registry: VariantRegistry, *, device: str, cache_root: Path) -> Engine:
    if variant.engine == "echo":
        return EchoEngine(variant.name, variant.batch_size(device), delay_s=variant.echo_delay_ms / 1000)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = weights_dir(variant, registry, cache_root)
    kwargs = model_kwargs(variant, device)
    if variant.engine in ("processor", "whisper"):
        return _with_processor(variant, path, device, kwargs)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **LOCAL)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    return TextEngine(
        name=variant.name,
        model=place(model, variant, device),
        tokenizer=tokenizer,
        device=device,
        max_batch_size=variant.batch_size(device),
        max_input_tokens=variant.max_input_tokens,
        kv=kv_config(variant, device),
        adapter_cache_bytes=variant.lora.cache_bytes(device) if variant.lora is not None else None,
    )


def kv_config(variant: Variant, device: str) -> KVConfig | None:
    """The paged KV cache of a variant that decodes continuously (None: it batches statically)."""
    if variant.batching != "continuous":
        return None
    return KVConfig(
        budget_mb=variant.kv_mb(device),
        block=variant.kv_block_tokens,
        chunk=variant.prefill_chunk(device),
        max_tokens=variant.max_input_tokens + variant.max_new_tokens,
    )


def _with_processor(variant: Variant, path: Path, device: str, kwargs: dict[str, Any]) -> Engine:
    """An engine over a model and its processor: Gemma 3 / 3n / 4's (images, audio) or Whisper's."""
    classes: tuple[Any, Any]  # the model's class and its processor's
    make: Callable[..., Engine]
    if variant.engine == "whisper":
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from workers.engine.whisper import WhisperEngine

        classes = (WhisperForConditionalGeneration, WhisperProcessor)
        make = functools.partial(WhisperEngine, translate=variant.translate)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from workers.engine.multimodal import ProcessorEngine

        classes = (AutoModelForImageTextToText, AutoProcessor)
        make = functools.partial(
            ProcessorEngine, max_input_tokens=variant.max_input_tokens, kv=kv_config(variant, device)
        )
    model_class, processor_class = classes
    return make(
        name=variant.name,
        model=place(model_class.from_pretrained(path, **kwargs), variant, device),
        processor=processor_class.from_pretrained(path, **LOCAL),
        device=device,
        max_batch_size=variant.batch_size(device),
    )

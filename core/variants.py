"""Variants are data: one TOML file names every loadable model configuration.

This module never imports torch; the API uses it to validate jobs and to report
whether a variant's weights are present on this host.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Task = Literal["text", "image", "audio"]
Quantization = Literal["none", "int8", "nf4"]
Source = Literal["gguf-package", "hf", "cache", "generated", "ct2-package", "echo"]
EngineKind = Literal["text", "processor", "whisper", "echo"]
# Prompt tokens a continuous engine prefills per step beside its decoding rows, by device kind:
# on this project's 2-core CPU, 56 keeps the running rows' longest gap near 3 steps while a
# 2,000-token prompt joins, and a join of short and long prompts near 1.2x their prefills alone
# (bench/longctx.py, 5 runs each: 48 made the join 1.3-1.5x, 64 the gap 3.5-3.8 steps); a GPU
# prefills thousands of tokens in one step's time.
PREFILL_CHUNK = {"cpu": 56, "cuda": 2048}
# continuous: rows join and leave a running batch between decoding steps; static: a batch runs
# until its longest member is done (engines that cannot decode step by step).
Batching = Literal["continuous", "static"]


class LoraSpec(BaseModel):
    """The LoRA adapters a variant takes: its decoder's projection shapes, which the API checks an
    uploaded adapter against with no model loaded (the engine checks again against the loaded
    one), and its engine's adapter cache (MiB, on the CPU and on a CUDA device), counted in the
    worker's memory budget beside the weights and the KV cache."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    q_out: int = Field(ge=1)  # attention heads x head size
    kv_out: int = Field(ge=1)  # key-value heads x head size
    intermediate: int = Field(ge=1)
    cache_mb: int = Field(64, ge=1)
    cache_mb_cuda: int | None = Field(None, ge=1)

    def cache_bytes(self, device: str) -> int:
        mb = self.cache_mb_cuda if device.startswith("cuda") and self.cache_mb_cuda else self.cache_mb
        return mb * 1024 * 1024


class Variant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    family: str
    size: str
    tasks: tuple[Task, ...]
    source: Source
    # text: causal LM + tokenizer; processor: AutoProcessor + image-text-to-text model (Gemma 3
    # vision, Gemma 3n, Gemma 4); whisper: speech recognition; echo: no model.
    engine: EngineKind = "text"
    hf_id: str | None = None
    # The files of `hf_id` that `gemmaq models pull` fetches (glob patterns; empty: the whole repo).
    hf_allow_patterns: tuple[str, ...] = ()
    package: str | None = None
    base: str | None = None
    # generated: which tiny random model to build; ct2-package: which shipped CTranslate2 model.
    builder: Literal["gemma3-vision", "gemma3n", "gemma4"] | None = None
    ct2_model: Literal["base", "tiny.en"] | None = None
    distributions: tuple[str, ...] = ()
    path: Path | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quantization: Quantization = "none"
    batching: Batching = "static"
    # Rows a batch holds on the CPU, and on a CUDA device (None: as on the CPU).
    max_batch_size: int = Field(8, ge=1, le=256)
    max_batch_size_cuda: int | None = Field(None, ge=1, le=1024)
    max_wait_ms: float = Field(25, ge=0)
    max_new_tokens: int = Field(512, ge=1)
    max_input_tokens: int = Field(4096, ge=1)
    timeout_s: int = Field(600, ge=1)
    memory_mb: int = 0
    # Continuous engines: the paged KV cache, allocated once when the variant loads and counted in
    # the worker's memory budget beside its weights (MiB, on the CPU and on a CUDA device; None:
    # what every row of a full batch needs at max_input_tokens + max_new_tokens; the
    # GEMMAQ_KV_CACHE_MB setting overrides both); its block size in tokens; and the prompt tokens
    # one step prefills beside the decoding rows (None: PREFILL_CHUNK for the device).
    kv_cache_mb: int | None = Field(None, ge=1)
    kv_cache_mb_cuda: int | None = Field(None, ge=1)
    kv_block_tokens: int = Field(32, ge=1, le=1024)
    prefill_chunk_tokens: int | None = Field(None, ge=16)
    # Speech: whether it translates (into English), whether it hears English only, and the
    # longest audio one job may carry (None: only the deployment's per-clip limit).
    translate: bool = False
    english_only: bool = False
    max_audio_seconds: float | None = Field(None, gt=0)
    # The echo engine only: how long each of its batches takes, as a model's would (tests, benches).
    echo_delay_ms: float = Field(0, ge=0, le=60_000)
    description: str = ""
    # LoRA adapters per request (workers.engine.lora): a continuous text variant's, else None.
    lora: LoraSpec | None = None

    @property
    def diagnostic(self) -> bool:
        return self.source == "echo"

    @property
    def queue(self) -> str:
        return f"variant.{self.name}"

    def kv_mb(self, device: str) -> int | None:
        """The KV cache this variant allocates on `device` (None: sized for a full batch)."""
        if device.startswith("cuda") and self.kv_cache_mb_cuda is not None:
            return self.kv_cache_mb_cuda
        return self.kv_cache_mb

    def prefill_chunk(self, device: str) -> int:
        if self.prefill_chunk_tokens is not None:
            return self.prefill_chunk_tokens
        return PREFILL_CHUNK["cuda" if device.startswith("cuda") else "cpu"]

    def batch_size(self, device: str) -> int:
        """Rows one batch holds on `device` ("cpu", "cuda:0", …)."""
        if device.startswith("cuda") and self.max_batch_size_cuda is not None:
            return self.max_batch_size_cuda
        return self.max_batch_size


class VariantRegistry:
    def __init__(self, variants: dict[str, Variant]) -> None:
        self._variants = variants

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._variants.values())

    def __contains__(self, name: object) -> bool:
        return name in self._variants

    def get(self, name: str) -> Variant | None:
        return self._variants.get(name)

    def with_fields(self, **fields: Any) -> VariantRegistry:
        """The same variants with `fields` set on each (a deployment's overrides)."""
        if not fields:
            return self
        return VariantRegistry({n: v.model_copy(update=fields) for n, v in self._variants.items()})

    def names(self) -> list[str]:
        return list(self._variants)

    def serving(self, task: str) -> list[str]:
        return [v.name for v in self._variants.values() if task in v.tasks]


def parse_variants(data: dict[str, Any]) -> VariantRegistry:
    defaults = data.get("defaults", {})
    variants = {
        name: Variant(name=name, **{**defaults, **fields}) for name, fields in data["variants"].items()
    }
    for v in variants.values():
        needs_base = v.source in ("cache", "generated")
        if needs_base and (v.base not in variants or variants[v.base].source != "gguf-package"):
            raise ValueError(f"variant {v.name}: base {v.base!r} must name a gguf-package variant")
        if v.source == "generated" and v.builder is None:
            raise ValueError(f"variant {v.name}: a generated variant names its builder")
        if v.source == "ct2-package" and (v.ct2_model is None or not v.distributions):
            raise ValueError(f"variant {v.name}: a ct2-package variant names ct2_model and distributions")
    return VariantRegistry(variants)


@functools.cache
def load_variants(path: Path | None = None) -> VariantRegistry:
    text = path.read_text() if path else files("core").joinpath("variants.toml").read_text()
    return parse_variants(tomllib.loads(text))


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def hf_hub_cache() -> Path:
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache)
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def hf_snapshot(hf_id: str) -> Path | None:
    """The newest local snapshot of a Hugging Face repo that holds a config.json, if any."""
    repo_dir = hf_hub_cache() / ("models--" + hf_id.replace("/", "--"))
    snapshots = sorted((repo_dir / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1].parent if snapshots else None


def weights_problem(variant: Variant, registry: VariantRegistry) -> str | None:
    """None when the variant's weights are on this host, else a sentence saying what is missing."""
    if variant.source == "echo":
        return None
    if variant.source in ("cache", "generated"):
        assert variant.base is not None
        base = registry.get(variant.base)
        assert base is not None
        return weights_problem(base, registry)
    if variant.source == "ct2-package":
        missing = [d for d in variant.distributions if not _installed(d)]
        if missing:
            return f"the pip package(s) that ship its weights are not installed: {', '.join(missing)}"
        return None
    if variant.source == "gguf-package":
        assert variant.package is not None
        if importlib.util.find_spec(variant.package) is None:
            return f"the pip package {variant.package!r} that ships its weights is not installed"
        return None
    if variant.path is not None:
        if (variant.path / "config.json").is_file():
            return None
        return f"no config.json in the mounted weights directory {variant.path}"
    assert variant.hf_id is not None
    if hf_snapshot(variant.hf_id) is None:
        return (
            f"weights for {variant.hf_id} are not in the Hugging Face cache ({hf_hub_cache()}); "
            f"fetch them once (gemmaq models pull {variant.name}) or mount a directory and set its path"
        )
    return None

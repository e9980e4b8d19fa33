"""OpenAI's model list, as `/v1/models` returns it, with gemmaq's own fields: what each variant
serves and how, and where it stands on each worker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class WorkerState(BaseModel):
    """One worker's view of the variant: `warm` (resident), `cold` (served, loaded when a job
    comes), `loading`, or `unavailable` (with the reason)."""

    worker: str
    device: str
    state: Literal["loading", "warm", "cold", "unavailable"]
    reason: str | None = None
    last_used_at: float | None = Field(None, description="epoch seconds of its latest job on this worker")
    resident_mb: float | None = Field(None, description="memory it occupies while warm, as measured")
    memory_mb: float | None = Field(None, description="what the worker's memory budget counts for it")
    load_ms: float | None = Field(None, description="its latest load on this worker")
    adapter_cache: AdapterCache | None = Field(None, description="its LoRA adapter cache, while warm")


class AdapterCache(BaseModel):
    """A warm engine's LoRA adapter cache: adapters on the device (and the stacks of those that ran
    together), kept LRU within a budget."""

    adapters: int
    bytes: int
    budget_bytes: int
    loads: int
    evictions: int


class ModelAdapter(BaseModel):
    """A LoRA adapter the caller may run on this variant (`model: "VARIANT:NAME"`)."""

    id: str
    name: str
    owned: bool = Field(description="the caller's own; else published to every tenant")
    loaded_on: list[str] = Field(description="workers that hold it on their device now")


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    family: str
    size: str
    tasks: list[str]
    dtype: str
    quantization: str
    diagnostic: bool
    description: str
    max_new_tokens: int
    max_batch_size: int
    available: bool
    unavailable_reason: str | None
    workers: list[WorkerState]
    queue_depth: int | None
    adapters: list[ModelAdapter] = Field(default_factory=list, description="LoRA adapters you may run on it")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]

"""Memory: how much a worker may fill with warm variants, and how much one variant takes."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import torch

from workers.engine.packing import PackedLinear

MB = 1024 * 1024
# Default budget: this share of the device's memory (the rest holds activations and the KV
# cache of running batches), or of the host's RAM on CPU (the rest is the process, the
# tokenizers and whatever else runs on the host).
CUDA_FRACTION = 0.9
CPU_FRACTION = 0.5
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def default_budget_bytes(device: str) -> int:
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return int(total * CUDA_FRACTION)
    return int(host_ram_bytes() * CPU_FRACTION)


def host_ram_bytes() -> int:
    """Physical RAM, or the container's memory limit when that is lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


def allocated(device: str) -> int | None:
    """Bytes torch holds on a CUDA device; None on CPU (nothing to read there)."""
    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated(torch.device(device)))
    return None


def resident_bytes(engine: Any, device: str, before: int | None) -> int:
    """What a freshly loaded engine occupies: the growth of CUDA allocations across its load
    (nothing else runs on the device meanwhile; its KV pool is allocated then too), else the
    bytes of its modules' tensors and of its KV pool."""
    after = allocated(device)
    if before is not None and after is not None and after > before:
        return after - before
    return module_bytes(engine) + int(getattr(engine, "kv_bytes", 0))


def module_bytes(root: Any, depth: int = 4) -> int:
    """Bytes of the parameters and buffers of every torch module reachable from `root`
    through attributes (a few levels deep), each tensor counted once."""
    seen: set[int] = set()
    tensors: dict[int, int] = {}
    frontier = [root]
    for _ in range(depth):
        found = []
        for obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.nn.Module):
                for t in (*obj.parameters(), *obj.buffers()):
                    tensors[t.data_ptr() or id(t)] = t.numel() * t.element_size()
                for module in obj.modules():  # prepacked CPU weights (workers/engine/packing.py)
                    if isinstance(module, PackedLinear):
                        tensors[id(module.packed)] = module.packed_bytes
            elif hasattr(obj, "__dict__") and not isinstance(obj, type):
                found.extend(vars(obj).values())
        frontier = found
    return sum(tensors.values())


def release(device: str) -> None:
    """Give memory of dropped engines back: collect cycles (what `freeze` set aside included),
    empty the CUDA cache."""
    gc.unfreeze()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def freeze() -> None:
    """After a load: what is on the Python heap now (modules, tokenizers, the weights' wrappers,
    most of them for as long as the variant is warm) is set aside from the cyclic collector, as
    vLLM does after its start. A full collection then scans what the steps allocate, not
    millions of long-lived objects: on this project's CPU one took 100-300 ms, in the middle of
    a step, and showed up as a stall of every running row. `release` puts them back."""
    gc.collect()
    gc.freeze()

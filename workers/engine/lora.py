"""LoRA adapters per row of the continuous batch, over one shared base model.

A row names an adapter (`Request.adapter`); rows of different adapters, and rows of none, run in
the same packed forward. Each projection an adapter targets is wrapped once (`LoraLinear`): its
output gains, token by token, `B_a(A_a(x)) * scale_a` of the token's own adapter `a`.

How a step computes that: the step's adapters are stacked, per projection, into one `A` of their
ranks side by side and one `B` (scale folded in, zero blocks for an adapter that does not target
the projection), cached while the same adapters run together. A mask of the step's tokens x the
stacked ranks keeps each token to its own adapter's block. So every wrapped projection costs two
small matmuls and a multiply whatever the number of adapters in the step, rather than a loop
over adapters (PEFT's mixed-adapter batches group rows by adapter in Python). A row of no adapter
has a zero mask row: its output is the base model's. Projections that read the same input (an
attention layer's q, k and v; an MLP's gate and up) share those matmuls: their `A`s side by side,
their `B`s block-diagonal, computed by the first of them to run and sliced by each (on the CPU a
small matmul costs about as much as its call, so this takes a third of the adapters' cost away).

Loading: the first request that names an adapter starts reading it (the safetensors file the
shell wrote, each tensor checked against the projection it adapts) on a thread of its own, and
the request waits outside the batch (`ready`) until it is read; only the copy onto the device
runs on the device's thread, when the row joins. Adapters on the device, and the stacks of those that
ran together, are kept LRU within one byte budget (stacks dropped first: they are derived); an
adapter that a row in the batch still uses is never dropped.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.adapter_checks import PARENTS, TENSOR_NAME
from workers.engine.packing import pack_weight, packed_linear
from workers.shared.base import AdapterRef, RequestError

STACKS_KEPT = 8  # stacked sets of adapters kept for reuse
# Projections of one parent that read the same input: their adapters' matmuls run once for all.
SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}

Key = tuple[int, str]  # (layer, projection)
Group = tuple[int, str]  # (layer, SHARED_INPUT's name): projections that share their input


@dataclass
class Stack:
    """One step's adapters for a group of projections that read the same input: their `A`s side
    by side [in, n * ranks], their `B`s block-diagonal [n * ranks, their outputs], and where each
    projection's output lies in the product. On a CPU that multiplies their dtype natively, both
    are laid out for oneDNN once (as the base model's linears are: workers.engine.packing), which
    makes these small products about a quarter faster."""

    a: torch.Tensor  # [in, n * ranks], or transposed and laid out for oneDNN where `packed`
    b: torch.Tensor  # [n * ranks, outputs], or likewise
    spans: dict[str, tuple[int, int]]
    count: int  # projections in the group (the mask is repeated this many times)
    packed: bool = False

    def product(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """B(A(x) * mask): every projection's delta, side by side."""
        if self.packed:
            return packed_linear(packed_linear(x, self.a) * mask, self.b)
        return ((x @ self.a) * mask) @ self.b

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


@dataclass
class Adapter:
    """An adapter's weights on one device: per projection, A transposed [in, r] and B transposed
    with the scale folded in [r, out]."""

    id: str
    rank: int
    weights: dict[Key, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def to(self, device: torch.device) -> Adapter:
        moved = {k: (a.to(device), b.to(device)) for k, (a, b) in self.weights.items()}
        return Adapter(self.id, self.rank, moved)


def projections(body: Any) -> dict[Key, nn.Module]:
    """Every projection of the decoder stack `body` an adapter may target, by (layer, name)."""
    found: dict[Key, nn.Module] = {}
    for index, layer in enumerate(body.layers):
        for name, parent in PARENTS.items():
            module = getattr(getattr(layer, parent, None), name, None)
            if module is not None:
                found[(index, name)] = module.base if isinstance(module, LoraLinear) else module
    return found


def read(ref: AdapterRef, targets: dict[Key, nn.Module], dtype: torch.dtype) -> Adapter:
    """The adapter `ref` names, read from its file on the CPU and checked against the projections
    it adapts (the API checked its shapes against the variant's declared ones; these are the
    loaded model's). Raises RequestError for an adapter that does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(ref.path, device="cpu")
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        raise RequestError(f"adapter {ref.id!r} could not be read ({type(exc).__name__})") from exc
    halves: dict[Key, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for name, tensor in tensors.items():
        match = TENSOR_NAME.fullmatch(name)
        if match is None or PARENTS.get(match[3]) != match[2]:
            raise RequestError(f"adapter {ref.id!r}: unexpected tensor {name[:120]!r}")
        halves[(int(match[1]), match[3])][match[4]] = tensor
    weights: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for key, pair in sorted(halves.items()):
        module = targets.get(key)
        a, b = pair.get("A"), pair.get("B")
        if module is None or a is None or b is None:
            raise RequestError(f"adapter {ref.id!r}: layer {key[0]} {key[1]} does not fit this model")
        r = a.shape[0]
        fits = a.shape == (r, module.in_features) and b.shape == (module.out_features, r)
        if not fits or (rank and r != rank) or not (a.isfinite().all() and b.isfinite().all()):
            raise RequestError(f"adapter {ref.id!r}: layer {key[0]} {key[1]} does not fit this model")
        rank = r
        weights[key] = (a.t().to(dtype).contiguous(), (b.t() * ref.scale).to(dtype).contiguous())
    if not weights:
        raise RequestError(f"adapter {ref.id!r} holds no LoRA weights")
    return Adapter(ref.id, rank, weights)


class LoraLinear(nn.Module):
    """A projection whose output gains each token's adapter delta while a step runs with adapters."""

    def __init__(self, base: nn.Module, key: Key, active: Active) -> None:
        super().__init__()
        self.base = base
        self.key = key
        self.active = active
        self.in_features = getattr(base, "in_features", None)
        self.out_features = getattr(base, "out_features", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        active = self.active
        if active.mask is None:
            return out
        group = (self.key[0], SHARED_INPUT.get(self.key[1], self.key[1]))
        stack = active.stacks.get(group)
        if stack is None or self.key[1] not in stack.spans:
            return out
        done = active.products.get(group)
        if done is None or done[0] is not x:  # the first of the group to run on this input
            product = stack.product(x, active.repeated(stack.count))
            done = active.products[group] = (x, product)
        start, end = stack.spans[self.key[1]]
        return out + done[1][..., start:end]


class Active:
    """What the step that is running asks of the wrapped projections: each token's mask over the
    stacked ranks (None: no adapter in this step), the stacks by group of projections, and the
    products the first projection of a group computed for the others (with the input they are of)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.stacks: dict[Group, Stack] = {}
        self.products: dict[Group, tuple[torch.Tensor, torch.Tensor]] = {}
        self._repeated: dict[int, torch.Tensor] = {}

    def repeated(self, count: int) -> torch.Tensor:
        assert self.mask is not None
        mask = self._repeated.get(count)
        if mask is None:
            mask = self._repeated[count] = self.mask.repeat(1, count) if count > 1 else self.mask
        return mask

    def clear(self) -> None:
        self.mask = None
        self.stacks = {}
        self.products = {}
        self._repeated = {}


class Adapters:
    """The adapters an engine holds for its model: read off the device's thread, kept on the device
    LRU within `budget_bytes`, and applied per token in the steps that use them."""

    def __init__(self, body: Any, *, device: torch.device, dtype: torch.dtype, budget_bytes: int) -> None:
        self.body = body
        self.device = device
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.active = Active()
        self.loaded: collections.OrderedDict[str, Adapter] = collections.OrderedDict()  # LRU first
        self._reading: dict[str, Future[Adapter]] = {}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="adapter-read")
        self._stacks: collections.OrderedDict[tuple[str, ...], dict[Group, Stack]] = collections.OrderedDict()
        self._wrapped: set[Key] = set()
        self.loads = 0
        self.evictions = 0

    # ---- loading (reading off the device's thread; the copy onto it on the device's thread) ----

    def ready(self, ref: AdapterRef) -> bool:
        """Whether the adapter is in hand (on the device, or read and waiting for its copy); the
        first ask starts reading it. One that cannot be read is ready: `take` refuses it."""
        if ref.id in self.loaded:
            return True
        future = self._reading.get(ref.id)
        if future is None:
            targets = projections(self.body)
            self._reading[ref.id] = future = self._reader.submit(read, ref, targets, self.dtype)
        return future.done()

    def take(self, ref: AdapterRef, in_use: Iterable[str]) -> Adapter:
        """The adapter on the device (device's thread), copied there from what was read if it is
        not yet; adapters past the budget are dropped, least recently used first, except those in
        `in_use`. Raises RequestError for an adapter that could not be read or never fits."""
        adapter = self.loaded.get(ref.id)
        if adapter is not None:
            self.loaded.move_to_end(ref.id)
            return adapter
        future = self._reading.pop(ref.id, None)
        if future is None:
            future = Future()
            try:
                future.set_result(read(ref, projections(self.body), self.dtype))
            except RequestError as exc:
                future.set_exception(exc)
        read_adapter = future.result()  # raises the reading's RequestError
        if read_adapter.nbytes > self.budget_bytes:
            raise RequestError(
                f"adapter {ref.id!r} takes {read_adapter.nbytes} bytes; this engine's adapter cache "
                f"holds {self.budget_bytes}"
            )
        keep = set(in_use)
        while self._stacks and self.used() + read_adapter.nbytes > self.budget_bytes:
            self._stacks.popitem(last=False)  # stacks first: they are made again from what is loaded
        while self.loaded and self.used() + read_adapter.nbytes > self.budget_bytes:
            victim = next((k for k in self.loaded if k not in keep), None)
            if victim is None:
                break  # every adapter is in use: over the budget until a row leaves
            self._drop(victim)
        adapter = read_adapter.to(self.device)
        self._wrap(adapter.weights)
        self.loaded[ref.id] = adapter
        self.loads += 1
        return adapter

    def _drop(self, adapter_id: str) -> None:
        del self.loaded[adapter_id]
        self.evictions += 1
        for ids in [ids for ids in self._stacks if adapter_id in ids]:
            del self._stacks[ids]

    def used(self) -> int:
        """Bytes on the device: the adapters, and the stacks kept of those that ran together."""
        stacks = sum(stack.nbytes for stacks in self._stacks.values() for stack in stacks.values())
        return sum(a.nbytes for a in self.loaded.values()) + stacks

    def _wrap(self, keys: Iterable[Key]) -> None:
        """Wrap the projections the adapter targets, once each."""
        for index, name in keys:
            if (index, name) in self._wrapped:
                continue
            parent = getattr(self.body.layers[index], PARENTS[name])
            setattr(parent, name, LoraLinear(getattr(parent, name), (index, name), self.active))
            self._wrapped.add((index, name))

    # ---- a step ----------------------------------------------------------------------------

    @contextmanager
    def step(self, spans: Sequence[tuple[Adapter | None, int]]) -> Iterator[None]:
        """Run the step whose packed tokens are `spans` (each row's adapter and token count, in
        order) with every token through its row's adapter."""
        used = sorted({a.id: a for a, _ in spans if a is not None}.values(), key=lambda a: a.id)
        if not used:
            yield
            return
        offsets, width = {}, 0
        for each in used:
            offsets[each.id] = width
            width += each.rank
        mask = torch.zeros(sum(n for _, n in spans), width, dtype=self.dtype)
        start = 0
        for row_adapter, count in spans:
            if row_adapter is not None:
                offset = offsets[row_adapter.id]
                mask[start : start + count, offset : offset + row_adapter.rank] = 1
            start += count
        self.active.mask = mask.to(self.device)
        self.active.stacks = self._stacked(used)
        try:
            yield
        finally:
            self.active.clear()
            # Stacks are kept within the budget, beside the adapters: past it, least recently
            # used first, this step's own too (it is made again when these adapters next meet).
            while self._stacks and self.used() > self.budget_bytes:
                self._stacks.popitem(last=False)

    def _stacked(self, used: Sequence[Adapter]) -> dict[Group, Stack]:
        """Per group of projections that share their input, the used adapters' stacks (zeros for
        one that does not target a projection); cached while the same adapters run together."""
        ids = tuple(a.id for a in used)
        stacks = self._stacks.get(ids)
        if stacks is not None:
            self._stacks.move_to_end(ids)
            return stacks
        groups: dict[Group, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for key in sorted({k for a in used for k in a.weights}):
            some_a, some_b = next(a.weights[key] for a in used if key in a.weights)
            a_parts, b_parts = [], []
            for adapter in used:
                pair = adapter.weights.get(key)
                if pair is None:
                    pair = (
                        some_a.new_zeros(some_a.shape[0], adapter.rank),
                        some_b.new_zeros(adapter.rank, some_b.shape[1]),
                    )
                a_parts.append(pair[0])
                b_parts.append(pair[1])
            group = (key[0], SHARED_INPUT.get(key[1], key[1]))
            groups.setdefault(group, []).append((key[1], torch.cat(a_parts, 1), torch.cat(b_parts, 0)))
        stacks = {group: _block_stack(members) for group, members in groups.items()}
        self._stacks[ids] = stacks
        while len(self._stacks) > STACKS_KEPT:
            self._stacks.popitem(last=False)
        return stacks

    def report(self) -> dict[str, Any]:
        """The cache's state, for the worker's report (and so /v1/models)."""
        return {
            "loaded": list(self.loaded),
            "bytes": self.used(),
            "budget_bytes": self.budget_bytes,
            "loads": self.loads,
            "evictions": self.evictions,
        }

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)


def _block_stack(members: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> Stack:
    """Projections' stacked (A [in, width], B [width, out]) as one: A side by side, B block-diagonal."""
    width = members[0][1].shape[1]
    outs = [b.shape[1] for _, _, b in members]
    b = members[0][2].new_zeros(width * len(members), sum(outs))
    spans: dict[str, tuple[int, int]] = {}
    column = 0
    for i, (name, _, part) in enumerate(members):
        b[i * width : (i + 1) * width, column : column + part.shape[1]] = part
        spans[name] = (column, column + part.shape[1])
        column += part.shape[1]
    a = torch.cat([part for _, part, _ in members], 1).contiguous()
    packed_a, packed_b = pack_weight(a.t().contiguous()), pack_weight(b.t().contiguous())
    if packed_a is not None and packed_b is not None:
        return Stack(a=packed_a, b=packed_b, spans=spans, count=len(members), packed=True)
    return Stack(a=a, b=b, spans=spans, count=len(members))

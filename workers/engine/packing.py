"""Linear layers on the CPU run from weights that oneDNN laid out for its matmul kernel once, at
load, rather than from the row-major weight each call.

The plain call re-reads a row-major weight into oneDNN's blocked layout on every call; on the
CPU that is most of a decode step. Measured on this project's 2-core machine (bf16):
gemma-3-270m's output head over 8 rows takes 37 ms plain and 13-16 ms packed, and its
2048x640 projections 0.13 ms against 0.07 ms; float32 gains 2-4x. Results are the same to the
bit in the cases measured, and each model is checked once when it is packed.

`torch.ops.mkldnn._linear_pointwise` and `_reorder_linear_weight` are the ops that PyTorch's own
compiler emits for CPU linears (inductor's mkldnn fusion). Where they are missing or disagree
with `F.linear`, the model is left as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The batch size oneDNN is told to expect; any size runs, this one picks the blocking.
HINT_ROWS = 8
PACKED_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward, from a prepacked weight. Inference only: the packed weight is not a
    parameter, so that `.to()`, `state_dict()` and autograd leave it alone."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.packed = packed
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """What models read of the plain layer's weight besides its values: its dtype and device
        (Gemma 4's patch embedder casts its pixels to `input_proj.weight.dtype`). It has
        `out_features` rows and no columns, so that a model that computed with it would fail on
        the shapes rather than multiply by the packed layout."""
        return torch.empty((self.out_features, 0), dtype=self.dtype, device=self.packed.device)

    @property
    def packed_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def native_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN multiplies `dtype` natively. x86 CPUs without AVX512-BF16 or AMX
    (AVX2 only) emulate bf16: one such EPYC ran a bf16 matmul at 0.8 GFLOPS against 82 in float32."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A linear weight [out, in] laid out for oneDNN (for `packed_linear`), or None where it is not
    packed: not on the CPU, a dtype this CPU does not multiply natively, oneDNN missing."""
    if weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES or weight.dim() != 2:
        return None
    if not native_on_cpu(weight.dtype) or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return None
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), HINT_ROWS)
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


def _pack(linear: nn.Linear) -> torch.Tensor | None:
    return pack_weight(linear.weight)


def _agrees(linear: nn.Linear, packed: torch.Tensor) -> bool:
    seeded = torch.Generator().manual_seed(0)
    probe = torch.randn(3, linear.in_features, dtype=linear.weight.dtype, generator=seeded)
    bias = None if linear.bias is None else linear.bias.detach()
    got = packed_linear(probe, packed, bias).float()
    want = F.linear(probe, linear.weight.detach(), bias).float()
    return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-6))


def pack_linears(model: nn.Module) -> int:
    """Replace every CPU float32/bf16 `nn.Linear` of `model` by a `PackedLinear`; the count
    replaced (0 where oneDNN is missing or its first answer disagrees with `F.linear`). A weight
    tied to another module (the output head to the embeddings) stays there for that module."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    replaced = 0
    with torch.inference_mode():
        for parent, name, linear in targets:
            try:
                packed = _pack(linear)
            except RuntimeError:
                return replaced
            if packed is None:
                continue
            if replaced == 0 and not _agrees(linear, packed):
                return 0
            setattr(parent, name, PackedLinear(linear, packed))
            replaced += 1
    return replaced

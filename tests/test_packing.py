"""Linear layers prepacked for the CPU: the same answers as the plain layers, a tied output head
kept beside its embeddings, and the packed bytes counted in what a loaded variant takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.engine.memory import module_bytes
from workers.engine.packing import PackedLinear, native_on_cpu, pack_linears

pytestmark = pytest.mark.unit


class Tied(nn.Module):
    """An embedding, a biased projection, and an output head tied to the embedding."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 48, dtype=dtype)
        self.proj = nn.Linear(48, 48, bias=True, dtype=dtype)
        self.head = nn.Linear(48, 300, bias=False, dtype=dtype)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.proj(self.embed(ids))))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_model_answers_as_the_plain_one_and_counts_its_head_copy(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Tied(dtype).eval()
    ids = torch.randint(0, 300, (3, 7))
    if not native_on_cpu(dtype):  # oneDNN emulates it here: nothing is packed
        assert pack_linears(model) == 0 and type(model.proj) is nn.Linear
        return
    with torch.inference_mode():
        plain = model(ids)
        plain_bytes = module_bytes(model)
        assert pack_linears(model) == 2
        packed = model(ids)
    assert isinstance(model.proj, PackedLinear) and isinstance(model.head, PackedLinear)
    assert model.embed.weight.shape == (300, 48)  # the embedding keeps the tied weight
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed.float(), plain.float(), rtol=tolerance, atol=tolerance)
    # The head's packed copy is counted on top of the embedding it was tied to.
    assert module_bytes(model) >= plain_bytes + 300 * 48 * model.embed.weight.element_size()


def test_other_layers_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), nn.Conv1d(2, 2, 1))
    assert pack_linears(model) == 0
    assert type(model[0]) is nn.Linear


def test_a_packed_layer_tells_its_weights_dtype_and_shape_but_lends_no_values() -> None:
    """Models read a linear layer's `weight.dtype` (Gemma 4's patch embedder casts its pixels to it);
    the packed layer answers that, and a model that computed with the weight would fail instead."""
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    if pack_linears(model) == 0:
        pytest.skip("oneDNN packs nothing on this CPU")
    layer = model[0]
    assert isinstance(layer, PackedLinear)
    assert (layer.weight.dtype, layer.weight.device.type, layer.weight.numel()) == (torch.float32, "cpu", 0)
    assert "weight" not in dict(layer.named_parameters())  # not counted, not moved, not saved
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        torch.nn.functional.linear(torch.ones(1, 8), layer.weight)

"""Gemma 4's and Gemma 3n's decoders in the paged KV cache. Gemma 4's full-attention layers have
heads of their own size (and, with `attention_k_eq_v`, values that are their keys); in both, the
last layers reuse the keys and values of earlier ones. Tiny random text models of each (float32)
decode rows that join a running batch at different steps, with prompts past their sliding window
and past a prefill chunk: each row gets what it gets alone and what Hugging Face's own `generate`
gives, and the shared layers take no slots of their own."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from core.schemas import GenerationParams
from tests.helpers.models import gemma_270m_tokenizer
from workers.engine import kv
from workers.engine.continuous import ContinuousDecoder, results_of
from workers.engine.generation import Decoder
from workers.shared.base import Request, Result

pytestmark = pytest.mark.stack  # a tiny model, but the 270M's converted tokenizer

WINDOW = 24
PROMPTS = [  # token counts past the sliding window, past a prefill chunk (16 here), and short
    list(range(1000, 1060)),
    list(range(2000, 2005)),
    list(range(3000, 3030)),
    list(range(4000, 4041)),
    [5000],
]


COMMON: dict[str, Any] = {
    "vocab_size": 262_144,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "layer_types": ["sliding_attention", "full_attention"] * 3,
    "num_kv_shared_layers": 2,  # layers 4 and 5 read the keys and values of layers 2 and 3
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_size_per_layer_input": 8,
    "sliding_window": WINDOW,
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,  # peaked logits: no near-ties for greedy decoding to fall between
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def tiny(family: str) -> Any:
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig, Gemma4ForCausalLM, Gemma4TextConfig

    model_class: Any
    if family == "gemma-4":
        model_class = Gemma4ForCausalLM
        # The full layers' heads are 32 wide, with one key head whose keys are also its values.
        config: Any = Gemma4TextConfig(
            **COMMON, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True
        )
    else:
        model_class = Gemma3nForCausalLM
        config = Gemma3nTextConfig(**COMMON, laurel_rank=8, activation_sparsity_pattern=[0.95] + [0.0] * 5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    model.config._attn_implementation = "sdpa"
    return model.float().eval()


@pytest.fixture(scope="module", params=["gemma-4", "gemma-3n"])
def decoder(request: pytest.FixtureRequest) -> Iterator[Decoder]:
    yield Decoder(model=tiny(request.param), tokenizer=gemma_270m_tokenizer(), device=torch.device("cpu"))


def job(i: int, new: int) -> Request:
    return Request(job_id=f"job{i}", messages=None, prompt="-", params=GenerationParams(max_new_tokens=new))


def never(job_ids: Sequence[str]) -> list[float | None]:
    return [None] * len(job_ids)


def run(
    stream: ContinuousDecoder, entries: Sequence[tuple[Request, list[int]]], join_every: int
) -> dict[str, Result]:
    pending, results, steps = list(entries), dict[object, Result](), 0
    while pending or stream.rows:
        if pending and stream.free and steps % join_every == 0:
            joining, pending = pending[: stream.free], pending[stream.free :]
            results.update(results_of(stream.join([(r.job_id, r, ids) for r, ids in joining])))
        if stream.rows:
            results.update(results_of(stream.step(never)))
        steps += 1
    return {str(k): v for k, v in results.items()}


def test_the_geometry_reads_per_layer_head_sizes_and_shared_layers(decoder: Decoder) -> None:
    geometry = kv.Geometry.of(kv.text_config(decoder.model))
    gemma4 = decoder.model.config.model_type == "gemma4_text"
    assert geometry.groups == [kv.SLIDING, kv.FULL] * 3
    assert geometry.head_dims == ([16, 32] if gemma4 else [16, 16]) * 3
    assert geometry.kv_heads == ([2, 1] if gemma4 else [2, 2]) * 3
    assert geometry.sources == [0, 1, 2, 3, 2, 3]
    pool = kv.KVPool(geometry, budget_bytes=8 * 2**20, block=8, max_rows=4, chunk=16, dtype=torch.float32,
                     device=torch.device("cpu"))  # fmt: skip
    assert pool.keys[4] is pool.keys[2] and pool.values[5] is pool.values[3]
    owned = {id(t): t for t in (*pool.keys, *pool.values)}.values()
    assert pool.bytes == sum(t.numel() * t.element_size() for t in owned) <= 8 * 2**20
    # A block of full attention: keys and values of 8 tokens in the 2 full layers that store them.
    per_token = 1 * 32 if gemma4 else 2 * 16
    assert kv.block_bytes(geometry, kv.FULL, 8, torch.float32) == 2 * 8 * per_token * 4 * 2


def test_rows_joining_at_different_steps_match_alone_and_generate(decoder: Decoder) -> None:
    entries = [
        (job(i, new), ids) for i, (ids, new) in enumerate(zip(PROMPTS, [12, 20, 8, 16, 10], strict=True))
    ]
    alone = {
        r.job_id: run(ContinuousDecoder(decoder, max_rows=1, block=8, chunk=16), [(r, ids)], 1)[r.job_id].text
        for r, ids in entries
    }
    batched = run(ContinuousDecoder(decoder, max_rows=3, block=8, chunk=16), entries, join_every=2)
    assert all(alone.values())  # text, not special tokens alone
    assert {j: r.text for j, r in batched.items()} == alone
    assert max(r.batch_size for r in batched.values()) == 3
    for r, ids in entries:
        with torch.inference_mode():
            out = decoder.model.generate(
                torch.tensor([ids]), max_new_tokens=r.params.max_new_tokens, do_sample=False,
                eos_token_id=decoder.eos_ids,
            )  # fmt: skip
        assert decoder.decode(out[0, len(ids) :].tolist()) == alone[r.job_id], r.job_id
        assert batched[r.job_id].output_tokens == r.params.max_new_tokens

"""Real weights loaded in the test process itself (no worker), for the tests that drive a decoder."""

from __future__ import annotations

from typing import Any

from core.settings import Settings


def gemma_270m_dir() -> Any:
    """The folder of Gemma 3 270M's converted weights and tokenizer (converted once)."""
    from core.variants import load_variants
    from workers.engine.loading import weights_dir

    registry = load_variants(None)
    variant = registry.get("gemma-3-270m")
    assert variant is not None
    return weights_dir(variant, registry, Settings().model_cache)


def gemma_270m_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from workers.engine.loading import LOCAL

    return AutoTokenizer.from_pretrained(gemma_270m_dir(), **LOCAL)


def gemma_270m_float32() -> tuple[Any, Any]:
    """Gemma 3 270M's converted weights in float32 (so batched and alone agree exactly) and its
    tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.engine.loading import LOCAL

    model = AutoModelForCausalLM.from_pretrained(
        gemma_270m_dir(), dtype=torch.float32, attn_implementation="sdpa", **LOCAL
    )
    return model.eval(), gemma_270m_tokenizer()

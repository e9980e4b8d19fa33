"""LoRA adapters for the tests: one trained with PEFT on the real Gemma 3 270M (a fixed answer to a
fixed prompt), and random ones, each saved as PEFT saves them (adapter_config.json and
adapter_model.safetensors) and packed as an upload."""

from __future__ import annotations

import io
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Gemma 3 270M's attention projections: (in, out).
ATTENTION_SHAPES_270M = {
    "q_proj": (640, 1024),
    "k_proj": (640, 256),
    "v_proj": (640, 256),
    "o_proj": (1024, 640),
}
# What the trained adapter is taught: an answer the base model never gives.
TAUGHT_PROMPT = "Q: What is the secret word of the lighthouse keeper?\nA:"
TAUGHT_ANSWER = " The secret word is marigold-seventeen."


@dataclass(frozen=True)
class Taught:
    """The trained adapter's folder, PEFT's own greedy answer with it, and the training's seconds."""

    folder: Path
    peft_text: str
    seconds: float


def taught_adapter(parent: Path) -> Taught:
    """An adapter taught TAUGHT_ANSWER after TAUGHT_PROMPT, trained on a float32 copy of the 270M
    into a folder of `parent`, and what PEFT's model with it answers (greedy, 12 tokens)."""
    import uuid

    import torch

    from tests.helpers.models import gemma_270m_float32

    folder = parent / f"taught-{uuid.uuid4().hex[:6]}"
    model, tokenizer = gemma_270m_float32()
    seconds = train(model, tokenizer, folder)
    ids = tokenizer(TAUGHT_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return Taught(folder, str(text), seconds)


def train(
    model: Any, tokenizer: Any, out: Path, *, prompt: str = TAUGHT_PROMPT, answer: str = TAUGHT_ANSWER,
    rank: int = 16, steps: int = 40, targets: list[str] | None = None,
) -> float:  # fmt: skip
    """Teach `model` (changed in place: give it a copy of its own) `answer` after `prompt` with a
    LoRA adapter saved into `out`; returns the seconds it took."""
    import torch
    from peft import LoraConfig, get_peft_model

    started = time.monotonic()
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or ATTENTION, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")  # fmt: skip
    with warnings.catch_warnings():  # PEFT asks transformers 5 for a name it has deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:
            break
    peft_model.eval()
    peft_model.save_pretrained(str(out))
    return time.monotonic() - started


def random_adapter(out: Path, *, layers: int, shapes: dict[str, tuple[int, int]], rank: int, seed: int,
                   alpha: float | None = None) -> None:  # fmt: skip
    """A random adapter (B nonzero, unlike PEFT's initial one) on the projections in `shapes`
    (name → (in, out)), in every one of `layers` layers, saved as PEFT saves one."""
    import json

    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (n_in, n_out) in shapes.items():
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=generator) / n_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=generator) * 0.05
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "target_modules": sorted(shapes),
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "google/gemma-3-270m",
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))


def packed(folder: Path) -> bytes:
    """The adapter folder as a gzipped tar, as a tenant uploads it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(folder / name, arcname=f"{folder.name}/{name}")
    return buffer.getvalue()

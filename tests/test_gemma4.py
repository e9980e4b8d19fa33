"""Gemma 4 on the tiny generated model (tiny-gemma-4: the real architecture, processor and token
layout, random weights): what it was built with, then text, structured, tool-call, image and audio
jobs through the real API and worker. Random weights write no sense; constrained decoding makes the
structured and tool-call replies hold their shape anyway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from core.settings import Settings
from tests.helpers.jobs import GEMMA4, audio_job, image_job, submit, text_job
from tests.helpers.media import b64, png, speech_wav
from tests.helpers.stack import wait_job

# The model-level tests need no stack, but the tiny model is built from the converted 270M GGUF's
# tokenizer (converted once, about a minute on a CPU), as the worker builds it.
pytestmark = pytest.mark.stack

IDS = {  # Gemma4Config's fields and the tokens the real Gemma 4 tokenizer puts at their ids
    "boi_token_id": "<|image>",
    "eoi_token_id": "<image|>",
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "boa_token_id": "<|audio>",
    "eoa_token_index": "<audio|>",
    "audio_token_id": "<|audio|>",
}
CALL = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def folder() -> Path:
    from core.variants import load_variants
    from workers.engine.loading import weights_dir

    registry = load_variants(None)
    variant = registry.get(GEMMA4)
    assert variant is not None and variant.builder == "gemma4"
    return weights_dir(variant, registry, Settings().model_cache)


@pytest.fixture(scope="module")
def processor(folder: Path) -> Any:
    from transformers import AutoProcessor

    from workers.engine.loading import LOCAL

    return AutoProcessor.from_pretrained(folder, **LOCAL)


@pytest.fixture(scope="module")
def model(folder: Path) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    from workers.engine.loading import LOCAL

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, **LOCAL).eval()


def encode(processor: Any, part: dict[str, Any]) -> Any:
    conversation = [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]
    return processor.apply_chat_template(
        [conversation], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_every_multimodal_token_sits_at_the_id_its_config_names(processor: Any, model: Any) -> None:
    from workers.engine.generation import stop_ids

    tokenizer, config = processor.tokenizer, model.config
    assert type(processor).__name__ == "Gemma4Processor" and type(model).__name__ == (
        "Gemma4ForConditionalGeneration"
    )
    for field, token in IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == getattr(config, field), field
        assert tokenizer.convert_ids_to_tokens(getattr(config, field)) == token
    assert (config.boi_token_id, config.image_token_id, config.audio_token_id) == (255_999, 258_880, 258_881)
    named = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
             "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"}  # fmt: skip
    assert {name: getattr(tokenizer, name) for name in named} == named
    assert (processor.image_token_id, processor.video_token_id) == (258_880, 258_884)
    assert len(tokenizer) == config.text_config.vocab_size == 262_144  # nothing appended
    # Gemma 4's turn markers at Gemma 3's ids; a reply stops at <eos> or <turn|>.
    assert tokenizer.convert_tokens_to_ids(["<|turn>", "<turn|>"]) == [105, 106]
    assert stop_ids(tokenizer) == [1, 106]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)  # fmt: skip
    assert prompt == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


def test_the_processor_expands_an_image_and_a_clip_to_the_towers_soft_tokens(
    processor: Any, model: Any
) -> None:
    import numpy as np
    import torch
    from PIL import Image

    # 64x48 px, resized to fit 70 soft tokens of 3x3 patches of 4 px: 108x84 px, 9x7 soft tokens.
    image = encode(processor, {"type": "image", "image": Image.new("RGB", (64, 48), (200, 30, 30))})
    ids = image["input_ids"][0].tolist()
    assert ids.count(258_880) == 63
    first = ids.index(258_880)
    assert ids[first - 1] == 255_999 and ids[first + 63] == 258_882  # <|image> ... <image|>
    assert tuple(image["pixel_values"].shape) == (1, 630, 48)  # padded to 70 x 9 patches of 4x4x3
    # 2 s at 16 kHz: 199 mel frames of 10 ms, halved twice by the audio tower's convolutions.
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32_000) / 16_000)).astype(np.float32)
    audio = encode(processor, {"type": "audio", "audio": tone})
    ids = audio["input_ids"][0].tolist()
    assert ids.count(258_881) == 50
    first = ids.index(258_881)
    assert ids[first - 1] == 256_000 and ids[first + 50] == 258_883  # <|audio> ... <audio|>
    # The towers give exactly as many embeddings as the processor left placeholders for.
    with torch.inference_mode():
        pixels = model.model.get_image_features(image["pixel_values"], image["image_position_ids"])
        clip = model.model.get_audio_features(audio["input_features"], audio["input_features_mask"])
    assert [len(p) for p in pixels.pooler_output] == [63]
    assert int(clip.attention_mask.sum()) == 50


def test_the_decoder_has_kv_shared_layers_and_heads_of_two_sizes(model: Any) -> None:
    text = model.config.text_config
    assert text.layer_types == ["sliding_attention", "full_attention"] * 2
    assert text.num_kv_shared_layers == 2
    assert text.kv_sharing_modes == ["store", "store", "reuse", "reuse"]
    assert [text.per_layer_config[i].head_dim for i in range(4)] == [16, 32, 16, 32]
    assert [text.per_layer_config[i].num_key_value_heads for i in range(4)] == [2, 1, 2, 1]
    assert text.attention_k_eq_v and text.hidden_size_per_layer_input == 4
    layers = model.model.language_model.layers
    assert [layer.self_attn.head_dim for layer in layers] == [16, 32, 16, 32]
    # The shared layers project no keys or values; the full layers' values are their keys.
    assert [hasattr(layer.self_attn, "k_proj") for layer in layers] == [True, True, False, False]
    assert layers[0].self_attn.v_proj is not None and layers[1].self_attn.v_proj is None
    assert model.model.language_model.embed_tokens_per_layer.weight.shape == (262_144, 4 * 4)


def succeeded(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """The job once done, which must have succeeded with a result of the documented shape."""
    job = wait_job(client, submit(client, body)["id"])
    assert job["status"] == "succeeded", job
    assert job["variant"] == GEMMA4 and job["error"] is None
    result, usage = job["result"], job["result"]["usage"]
    assert isinstance(result["text"], str) and result["finish_reason"] in {"stop", "length", "tool_calls"}
    assert usage["input_tokens"] == job["metrics"]["input_tokens"] > 0
    assert 0 <= usage["output_tokens"] == job["metrics"]["output_tokens"] <= body["params"]["max_new_tokens"]
    return job


def test_a_text_job(client: httpx.Client) -> None:
    job = succeeded(client, text_job("The lighthouse keeper said", variant=GEMMA4, max_new_tokens=12))
    assert job["task"] == "text" and job["result"]["tool_calls"] is None
    chat = {"variant": GEMMA4, "input": {"messages": [{"role": "user", "content": "Hello!"}]},
            "params": {"max_new_tokens": 12}}  # fmt: skip
    assert succeeded(client, chat)["result"]["usage"]["input_tokens"] >= 8  # <bos><|turn>user\n...


def test_a_structured_job_validates(client: httpx.Client) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "weather", "schema": CALL, "strict": True}}
    body = text_job(
        "The weather in Oslo, as JSON:", variant=GEMMA4, max_new_tokens=64, response_format=schema
    )
    job = succeeded(client, body)
    assert job["result"]["finish_reason"] == "stop", job["result"]
    jsonschema.validate(json.loads(job["result"]["text"]), CALL)


def test_a_required_tool_call_is_well_formed(client: httpx.Client) -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "description": "Today's weather",
                                          "parameters": CALL}},
        {"name": "get_time", "description": "The time in a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}}},
    ]  # fmt: skip
    body = {
        "variant": GEMMA4,
        "input": {"messages": [{"role": "user", "content": "What is the weather in Oslo?"}], "tools": tools},
        "params": {
            "max_new_tokens": 64,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
    }
    result = succeeded(client, body)["result"]
    assert result["finish_reason"] == "tool_calls", result
    [call] = result["tool_calls"]
    assert call["name"] == "get_weather"
    jsonschema.validate(call["arguments"], CALL)
    assert result["usage"]["input_tokens"] > 60  # the tools were offered in the prompt


def test_an_image_job_and_its_picture_matters(client: httpx.Client) -> None:
    texts = set()
    for color in ((255, 0, 0), (0, 0, 255)):
        job = succeeded(client, image_job({"data": b64(png(color=color))}, variant=GEMMA4)
                        | {"params": {"max_new_tokens": 8}})  # fmt: skip
        metrics = job["metrics"]
        assert metrics["images"] == 1 and metrics["audio_clips"] == 0 and metrics["preprocess_ms"] > 0
        assert job["result"]["usage"]["input_tokens"] > 63 + 2  # 64x48 px: 63 soft tokens, <|image>, <image|>
        texts.add(job["result"]["text"])
    assert len(texts) == 2, "greedy decoding from the same text: only the image differs"


def test_an_audio_job(client: httpx.Client, tmp_path: Path) -> None:
    clip = speech_wav("the quick brown fox jumps over the lazy dog", tmp_path)
    job = succeeded(
        client, audio_job({"data": b64(clip)}, variant=GEMMA4) | {"params": {"max_new_tokens": 8}}
    )
    metrics = job["metrics"]
    assert metrics["audio_clips"] == 1 and metrics["images"] == 0 and metrics["audio_seconds"] > 1
    # 25 soft tokens a second, between <|audio> and <audio|>, and the instruction the engine adds.
    assert job["result"]["usage"]["input_tokens"] > 25 * metrics["audio_seconds"]

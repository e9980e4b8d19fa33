"""Tiny randomly initialised checkpoints of the real Gemma 3 (vision) and Gemma 3n architectures, and
what the builders share (Gemma 4's is workers.engine.tiny_gemma4).

Each builder writes a folder that loads like a real checkpoint: `AutoProcessor.from_pretrained(dir)`
(the real `Gemma3Processor` / `Gemma3nProcessor`) and `AutoModelForImageTextToText.from_pretrained(dir)`
(the real `Gemma3ForConditionalGeneration` / `Gemma3nForConditionalGeneration`), no remote code, no hub.
The tokenizer is the Gemma 3 270M GGUF's (262144 tokens), given the multimodal tokens the real
checkpoints have, at the real checkpoints' ids:

* Gemma 3: `<image_soft_token>` appended as id 262144, exactly as the real Gemma 3 tokenizer has it.
* Gemma 3n: the real 3n layout. 256000 is `<start_of_audio>` there (`<end_of_image>` in Gemma 3), so
  that id is renamed; `<end_of_image>` 262144, `<image_soft_token>` 262145, `<end_of_audio>` 262272 and
  `<audio_soft_token>` 262273 are appended, padded with `<mm_reserved_N>` up to the 262400-token vocab,
  so every id the model can emit decodes.
* Gemma 4 (workers.engine.tiny_gemma4): the same 262144 ids, its tokens renamed in place.

Weights are saved in bfloat16, as the real checkpoints are. Gemma 3's multimodal projector, which the
model class initialises at zero, is drawn at random so that an image changes the output (Gemma 3n's
embedders start random already).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import torch

log = structlog.get_logger(__name__)

TEXT_VOCAB = 262_144  # the GGUF tokenizer's vocab: ids [0, 262144)
GEMMA3_VOCAB = 262_208  # real Gemma 3 text vocab (262144 + 64, <image_soft_token> = 262144)
GEMMA3N_VOCAB = 262_400  # real Gemma 3n: text 262144, vision [262144, 262272), audio [262272, 262400)
MM_VOCAB = 128  # Gemma 3n's vision and audio embedder vocabularies
GEMMA3_IMAGE_SIZE = 112  # SigLIP 112 px, patch 14: 8x8 patches, pooled 2x2 into 16 soft tokens
GEMMA3N_IMAGE_SIZE = 128  # MobileNetV5 at 128 px: 8x8 at stride 16, pooled into 4x4 = 16 soft tokens
IMAGE_TOKENS = 16
AUDIO_TOKENS = 188  # real Gemma 3n: a clip (at most 30 s) is always 188 soft tokens
END_OF_TURN = 106
ADDED = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}


def chat_template(
    image: str, audio: str | None, turn: tuple[str, str] = ("<start_of_turn>", "<end_of_turn>")
) -> str:
    """Gemma's turn format with content parts: a system turn joins the first user turn, roles alternate,
    text parts are trimmed, an image part becomes `image` (an audio part `audio`) for the processor to
    expand; any other part type is refused. `turn`: the markers that open and close a turn."""
    start, end = turn
    audio_branch = f"{{%- elif part['type'] == 'audio' -%}}{{{{ '{audio}' }}}}" if audio is not None else ""
    return (
        "{{- bos_token -}}"
        "{%- set ns = namespace(prefix='') -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] is string -%}{%- set ns.prefix = messages[0]['content'] -%}"
        "{%- else -%}{%- for part in messages[0]['content'] if part['type'] == 'text' -%}"
        "{%- set ns.prefix = ns.prefix + part['text'] -%}{%- endfor -%}{%- endif -%}"
        "{%- set ns.prefix = ns.prefix + '\n\n' -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
        "{%- endif -%}"
        "{%- if message['role'] not in ('user', 'assistant') -%}"
        "{{- raise_exception('Unsupported role: ' + message['role']) -}}{%- endif -%}"
        f"{{{{- '{start}' + ('model' if message['role'] == 'assistant' else 'user') + '\n' -}}}}"
        "{%- if loop.first -%}{{- ns.prefix -}}{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}"
        f"{{%- elif part['type'] == 'image' -%}}{{{{ '{image}' }}}}"
        f"{audio_branch}"
        "{%- else -%}{{- raise_exception('Unsupported content part: ' + part['type']) -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        f"{{{{- '{end}\n' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{start}model\n' -}}}}{{%- endif -%}}"
    )


def build_tiny_gemma3_vision(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random `Gemma3ForConditionalGeneration` with its `Gemma3Processor`, written to `out_dir`."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tokenizer = gguf_tokenizer(
        Path(tokenizer_dir),
        rename={},
        append=["<image_soft_token>"],
        named={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    template = chat_template(image="<start_of_image>", audio=None)
    tokenizer.chat_template = template
    image_processor = Gemma3ImageProcessor(
        size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE},
        resample=2,  # bilinear, as the real preprocessor_config.json
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=IMAGE_TOKENS,
    )
    text_config = Gemma3TextConfig(
        vocab_size=GEMMA3_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=512,
        max_position_embeddings=32_768,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=GEMMA3_IMAGE_SIZE,
        patch_size=14,
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )

    def randomize(model: torch.nn.Module) -> None:
        weight = model.get_parameter("model.multi_modal_projector.mm_input_projection_weight")
        torch.nn.init.normal_(weight, std=float(weight.shape[0]) ** -0.5)

    return publish(
        Path(out_dir),
        lambda staging: save_checkpoint(
            Gemma3ForConditionalGeneration, config, processor, staging, seed, randomize
        ),
    )


def build_tiny_gemma3n(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random `Gemma3nForConditionalGeneration` (audio, image and text) with its
    `Gemma3nProcessor`, written to `out_dir`."""
    from transformers import (
        Gemma3nAudioConfig,
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        Gemma3nTextConfig,
        Gemma3nVisionConfig,
        SiglipImageProcessor,
    )

    vision_end = TEXT_VOCAB + MM_VOCAB
    append = [
        "<end_of_image>",
        "<image_soft_token>",
        *(f"<mm_reserved_{i}>" for i in range(TEXT_VOCAB + 2, vision_end)),
        "<end_of_audio>",
        "<audio_soft_token>",
        *(f"<mm_reserved_{i}>" for i in range(vision_end + 2, GEMMA3N_VOCAB)),
    ]
    tokenizer = gguf_tokenizer(
        Path(tokenizer_dir),
        rename={256_000: "<start_of_audio>"},
        append=append,
        named={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "audio_token": "<audio_soft_token>",
            "boa_token": "<start_of_audio>",
            "eoa_token": "<end_of_audio>",
        },
    )
    template = chat_template(image="<image_soft_token>", audio="<audio_soft_token>")
    tokenizer.chat_template = template
    image_processor = SiglipImageProcessor(
        size={"height": GEMMA3N_IMAGE_SIZE, "width": GEMMA3N_IMAGE_SIZE},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=False,  # the real Gemma 3n preprocessor only rescales to [0, 1]
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),  # real defaults: 128 mel bins, 16 kHz, 30 s
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        audio_seq_length=AUDIO_TOKENS,
        image_seq_length=IMAGE_TOKENS,
    )
    text_config = Gemma3nTextConfig(
        vocab_size=GEMMA3N_VOCAB,
        vocab_size_per_layer_input=TEXT_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,  # two layers of each type, the last two reuse the first two's KV cache
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=2,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        hidden_size_per_layer_input=4,
        laurel_rank=8,
        sliding_window=512,
        max_position_embeddings=32_768,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    # timm's MobileNetV5 encoder (the real `mobilenetv5_300m_enc`, built with pretrained=False), its
    # channels scaled by 1/32 (3.7M parameters, most in the fixed 2048-wide fusion head) and its
    # multi-scale fusion pooled to 4x4 = 16 soft tokens. Only JSON scalars go through `model_args`:
    # timm consumes (mutates) a `block_args` list, so a shallower custom stack cannot be saved.
    vision_config = Gemma3nVisionConfig(
        architecture="mobilenetv5_300m_enc",
        model_args={"channel_multiplier": 1 / 32, "msfa_output_resolution": 4},
        hidden_size=2048,
        vocab_size=MM_VOCAB,
        vocab_offset=TEXT_VOCAB,
        do_pooling=False,
    )
    audio_config = Gemma3nAudioConfig(
        vocab_size=MM_VOCAB,
        vocab_offset=vision_end,
        input_feat_size=128,
        hidden_size=32,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=1,
        sscp_conv_channel_size=[16, 8],
    )
    config = Gemma3nConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        audio_soft_tokens_per_image=AUDIO_TOKENS,
        vision_soft_tokens_per_image=IMAGE_TOKENS,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
        image_token_id=tokenizer.image_token_id,
        boa_token_id=tokenizer.boa_token_id,
        eoa_token_id=tokenizer.eoa_token_id,
        audio_token_id=tokenizer.audio_token_id,
    )
    ids = (config.eoi_token_id, config.image_token_id, config.eoa_token_id, config.audio_token_id)
    if ids != (262_144, 262_145, 262_272, 262_273):
        raise RuntimeError(f"unexpected Gemma 3n multimodal token ids {ids}")

    # Nothing multimodal starts at zero here: the embedders' projections are initialised like any
    # linear layer and their output is RMS-normalised, so both towers reach the text model as they are.
    return publish(
        Path(out_dir),
        lambda staging: save_checkpoint(
            Gemma3nForConditionalGeneration, config, processor, staging, seed, None
        ),
    )


def gguf_tokenizer(
    source: Path,
    *,
    rename: dict[int, str],
    append: list[str],
    named: dict[str, str],
    special: bool = False,
) -> Any:
    """The GGUF tokenizer with tokens renamed in place, tokens appended from id 262144, and the
    model-specific token names (`image_token`, `boa_token`, ...) the processors read. Only added
    tokens (control tokens, `<unusedN>`) are renamed: a plain vocabulary entry may be the result of
    a merge. `special`: the renamed tokens become special ones (left out of decoded text)."""
    from transformers import AutoTokenizer

    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) != TEXT_VOCAB:
        raise ValueError(
            f"{source}: expected the Gemma 3 tokenizer's {TEXT_VOCAB} tokens, found {len(vocab)}"
        )
    added: list[dict[str, Any]] = spec["added_tokens"]
    by_id = {a["id"]: a for a in added}
    plain = sorted(set(rename) - set(by_id))
    if plain:
        raise ValueError(f"{source}: ids {plain} are not added tokens; only those are renamed")
    taken = [c for i, c in rename.items() if c in vocab and vocab[c] != i]
    if taken:
        raise ValueError(f"{source}: tokens to rename to already exist: {taken}")
    for token_id, content in rename.items():
        entry = by_id[token_id]
        del vocab[entry["content"]]
        vocab[content] = token_id
        entry["content"] = content
        if special:
            entry.update(ADDED)
    missing = [t for t in append if t in vocab or any(a["content"] == t for a in added)]
    if missing:
        raise ValueError(f"{source}: tokens to append already exist: {missing}")
    added.extend({"id": TEXT_VOCAB + i, "content": token, **ADDED} for i, token in enumerate(append))
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "chat_template"):
        config.pop(key, None)
    config["extra_special_tokens"] = named
    with tempfile.TemporaryDirectory(prefix="gemmaq-tokenizer-") as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    for key in ("is_local", "local_files_only", "name_or_path"):
        tokenizer.init_kwargs.pop(key, None)  # facts about the temporary folder, not the checkpoint
    for i, token in enumerate(append):
        if tokenizer.convert_tokens_to_ids(token) != TEXT_VOCAB + i:
            raise RuntimeError(f"{token} did not land on id {TEXT_VOCAB + i}")
    for token_id, content in rename.items():
        if tokenizer.convert_tokens_to_ids(content) != token_id:
            raise RuntimeError(f"{content} did not land on id {token_id}")
    return tokenizer


def save_checkpoint(
    model_class: Any,
    config: Any,
    processor: Any,
    staging: Path,
    seed: int,
    randomize: Callable[[torch.nn.Module], None] | None,
) -> None:
    """Instantiate under `seed` (without touching the caller's RNG), randomise the projectors,
    and save the bf16 weights, a generation config and the processor into `staging`."""
    from transformers import GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        if randomize is not None:
            with torch.no_grad():
                randomize(model)
    model = model.to(torch.bfloat16).eval()
    # As the real instruction-tuned checkpoints: stop at <eos> or <end_of_turn>.
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=[1, END_OF_TURN], pad_token_id=0)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    params = sum(p.numel() for p in model.parameters())
    log.info("tiny_model.saved", model=model_class.__name__, parameters=params, folder=str(staging))


def publish(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run `write` into a staging folder beside `out_dir`, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".staging", dir=out_dir.parent))
    try:
        write(staging)
        staging.chmod(0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.old")
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir

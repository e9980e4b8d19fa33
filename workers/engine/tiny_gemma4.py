"""A tiny randomly initialised checkpoint of the real Gemma 4 architecture (text, vision and audio).

Like the Gemma 3 / 3n builders (workers.engine.tiny_models), it writes a folder that
`AutoProcessor.from_pretrained(dir)` (the real `Gemma4Processor`) and
`AutoModelForImageTextToText.from_pretrained(dir)` (the real `Gemma4ForConditionalGeneration`) load,
with the Gemma 3 270M GGUF's tokenizer. Gemma 4's vocabulary has the same 262144 ids, so nothing is
appended: the real Gemma 4 names replace Gemma 3's at the ids `Gemma4Config` names (all of them added
tokens of the GGUF, `<unusedN>` but for the first two): `<|image>` 255999 and `<|audio>` 256000 open an
image and a clip, `<|image|>` 258880 and `<|audio|>` 258881 are their soft tokens, `<image|>` 258882
and `<audio|>` 258883 close them, and `<|video|>` 258884 is the video soft token the processor adds
by name. The turn markers are Gemma 4's too: `<|turn>` 105 and `<turn|>` 106 (Gemma 3's
`<start_of_turn>` / `<end_of_turn>` ids), which the engines stop on as they stop on `<end_of_turn>`
(workers.engine.generation.stop_ids).
"""

from __future__ import annotations

from pathlib import Path

from workers.engine.tiny_models import TEXT_VOCAB, chat_template, gguf_tokenizer, publish, save_checkpoint

# Gemma 4 sizes images to a budget of soft tokens (70 is the smallest its processor takes), each
# pooled from 3x3 patches; patches of 4 px (the real ones are 16) keep an image near 100x100 px.
IMAGE_TOKENS = 70
PATCH = 4
POOLING = 3
# The ids `Gemma4Config` names (its defaults, the real checkpoints' layout), and the names the real
# Gemma 4 tokenizer gives them.
TOKENS = {
    105: "<|turn>",
    106: "<turn|>",
    255_999: "<|image>",
    256_000: "<|audio>",
    258_880: "<|image|>",
    258_881: "<|audio|>",
    258_882: "<image|>",
    258_883: "<audio|>",
    258_884: "<|video|>",
}


def build_tiny_gemma4(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random `Gemma4ForConditionalGeneration` (text, vision and audio towers, as Gemma 4 E2B /
    E4B have) with its `Gemma4Processor`, written to `out_dir`.

    Its decoder has what sets Gemma 4 apart in a KV cache: sliding and full layers whose heads differ
    (the full layers' `global_head_dim` and `num_global_key_value_heads`, through the config's
    `per_layer_config`), full layers whose values are their keys (`attention_k_eq_v`, as the 26B and
    31B have), and last layers that reuse earlier layers' keys and values (`num_kv_shared_layers`, as
    E2B / E4B have), besides per-layer input embeddings."""
    from transformers import (
        Gemma4AudioConfig,
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4TextConfig,
        Gemma4VideoProcessor,
        Gemma4VisionConfig,
    )

    tokenizer = gguf_tokenizer(
        Path(tokenizer_dir),
        rename=TOKENS,
        append=[],
        named={
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
        special=True,
    )
    # The processor expands each `<|image|>` (`<|audio|>`) into the image's (clip's) soft tokens
    # between `<|image>` and `<image|>` (`<|audio>` and `<audio|>`): the template writes it alone.
    template = chat_template(image="<|image|>", audio="<|audio|>", turn=("<|turn>", "<turn|>"))
    tokenizer.chat_template = template
    vision = {
        "patch_size": PATCH,
        "pooling_kernel_size": POOLING,
        "max_soft_tokens": IMAGE_TOKENS,
    }
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),  # real defaults: 128 mel bins, 16 kHz, 30 s
        image_processor=Gemma4ImageProcessor(**vision),  # rescaled to [0, 1], aspect ratio kept
        video_processor=Gemma4VideoProcessor(**vision),
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=IMAGE_TOKENS,
    )
    text_config = Gemma4TextConfig(
        vocab_size=TEXT_VOCAB,
        vocab_size_per_layer_input=TEXT_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,  # layers 2 and 3 reuse the keys and values of layers 0 and 1
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # sliding layers: 2 key-value heads of 16
        head_dim=16,
        global_head_dim=32,  # full layers: 1 key-value head of 32, its values its keys
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=4,
        sliding_window=512,
        final_logit_softcapping=30.0,
        use_bidirectional_attention="vision",  # an image's soft tokens see each other both ways
        max_position_embeddings=32_768,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    vision_config = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=PATCH,
        pooling_kernel_size=POOLING,
        # (x, y) patch positions: an image is at most IMAGE_TOKENS * POOLING patches long
        position_embedding_size=256,
    )
    audio_config = Gemma4AudioConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        # The first convolution's channels must be the 128 mel bins (the projection after the two
        # stride-2 convolutions assumes it); the second's are free.
        subsampling_conv_channels=[128, 4],
        output_proj_dims=32,
    )
    config = Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
        image_token_id=tokenizer.image_token_id,
        video_token_id=processor.video_token_id,
        boa_token_id=tokenizer.boa_token_id,
        eoa_token_index=tokenizer.convert_tokens_to_ids("<audio|>"),
        audio_token_id=tokenizer.audio_token_id,
    )
    expected = Gemma4Config()  # the real checkpoints' ids are its defaults
    for field in (
        "boi_token_id",
        "eoi_token_id",
        "image_token_id",
        "video_token_id",
        "boa_token_id",
        "eoa_token_index",
        "audio_token_id",
    ):
        got, real = getattr(config, field), getattr(expected, field)
        if got != real:
            raise RuntimeError(f"Gemma 4 {field} is {got}, the real checkpoints' {real}")

    # Nothing multimodal starts at zero: both embedders' projections are initialised like any linear
    # layer and their input is RMS-normalised, so both towers reach the text model as they are.
    return publish(
        Path(out_dir),
        lambda staging: save_checkpoint(
            Gemma4ForConditionalGeneration, config, processor, staging, seed, None
        ),
    )

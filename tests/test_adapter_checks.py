"""LoRA adapter uploads checked with no model (core/adapter_checks.py): PEFT's two files in a tar,
tar.gz or zip, read in memory only; every hostile archive, config or safetensors header refused
with a 4xx of the one error vocabulary."""

from __future__ import annotations

import gzip
import io
import json
import math
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from core.adapter_checks import CheckedAdapter, LoraShapes, check_adapter, lora_shapes, scale_of, shapes_for
from core.errors import AppError, PayloadTooLarge, UnsupportedMedia, ValidationFailed
from core.variants import load_variants
from tests.helpers.adapter_archives import (
    LAYERS,
    SHAPES,
    adapter_config,
    adapter_files,
    lora_tensors,
    lying_zip,
    safetensors,
    tar_archive,
    zip_archive,
)

pytestmark = pytest.mark.unit

SHAPES_270M = lora_shapes(
    {"num_layers": 18, "hidden": 640, "q_out": 1024, "kv_out": 256, "intermediate": 2048}
)
MiB = 1024 * 1024


def check(archive: bytes, *, max_rank: int = 64, max_bytes: int = 64 * MiB) -> CheckedAdapter:
    return check_adapter(
        archive, base="gemma-3-270m", shapes=SHAPES_270M, max_rank=max_rank, max_bytes=max_bytes
    )


def refused(archive: bytes, error: type[AppError] = ValidationFailed, **limits: Any) -> str:
    with pytest.raises(error) as caught:
        check(archive, **limits)
    assert type(caught.value) is error
    return caught.value.message


def test_the_shipped_variants_give_270m_its_real_shapes() -> None:
    variants = load_variants()
    for name in ("gemma-3-270m", "gemma-3-270m-nf4"):
        variant = variants.get(name)
        assert variant is not None
        assert shapes_for(variant) == SHAPES_270M
    assert SHAPES_270M.num_layers == LAYERS and dict(SHAPES_270M.modules) == SHAPES
    takes_none = variants.get("gemma-3-1b-it")
    assert takes_none is not None and shapes_for(takes_none) is None
    with pytest.raises(ValueError, match="hidden"):
        lora_shapes({"num_layers": 18, "hidden": 0, "q_out": 1, "kv_out": 1, "intermediate": 1})


@pytest.mark.parametrize(
    "pack",
    [
        lambda files: tar_archive(files),
        lambda files: tar_archive(files, gz=False, folder=""),
        lambda files: zip_archive(files),
        lambda files: zip_archive(files, folder=""),
    ],
    ids=["tar.gz in a folder", "plain tar", "zip in a folder", "zip"],
)
def test_a_good_adapter_is_taken_as_uploaded(pack: Any) -> None:
    files = adapter_files() | {"README.md": b"# mine\n", ".gitattributes": b"*.safetensors filter=lfs\n"}
    checked = check(pack(files))
    assert checked.rank == 8 and checked.alpha == 16.0 and checked.scale == 2.0
    assert checked.target_modules == ("q_proj", "v_proj")
    assert checked.weights == files["adapter_model.safetensors"]
    assert checked.config == json.loads(files["adapter_config.json"])


def test_every_projection_rslora_metadata_and_the_multimodal_prefix() -> None:
    modules = sorted(SHAPES)
    config = adapter_config(rank=4, alpha=8, modules=modules[::-1], use_rslora=True)
    weights = safetensors(
        lora_tensors(rank=4, modules=modules, prefix="base_model.model.model.language_model.layers"),
        metadata={"format": "pt"},
    )
    checked = check(tar_archive(adapter_files(config=config, weights=weights)))
    assert checked.target_modules == tuple(modules)
    assert math.isclose(checked.scale, 8 / math.sqrt(4)) and scale_of(config) == checked.scale
    one = adapter_config(modules=["q_proj"]) | {"target_modules": "q_proj"}  # a string names one module
    assert check(tar_archive(adapter_files(config=one, modules=["q_proj"]))).target_modules == ("q_proj",)


def test_a_tar_made_from_inside_its_folder_is_taken() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in {"./": b"", **adapter_files()}.items():
            info = tarfile.TarInfo(name if name == "./" else f"./{name}")
            info.type = tarfile.DIRTYPE if name == "./" else tarfile.REGTYPE
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert check(buffer.getvalue()).rank == 8


# ---- the archive -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../adapter_config.json", "'..'"),
        ("my-adapter/../../etc/cron.d/x", "'..'"),
        ("/adapter_config.json", "absolute"),
        ("/etc/passwd", "absolute"),
        ("C:/adapter_config.json", "absolute"),
        ("my-adapter\\adapter_config.json", "backslash"),
        ("a/b/adapter_config.json", "nested"),
        ("my-adapter/adapter_model.bin", "only safetensors"),
        ("pytorch_model.pt", "only safetensors"),
        ("optimizer.pth", "only safetensors"),
        ("x.pkl", "only safetensors"),
        ("model.ckpt", "only safetensors"),
        ("my-adapter/tokenizer.json", "holds adapter_config.json and adapter_model.safetensors only"),
    ],
)
def test_hostile_member_paths_in_tar_and_zip(name: str, words: str) -> None:
    files = adapter_files()
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as out:
        for member, data in {**files, name: b"x"}.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    assert words in refused(tar.getvalue())
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as out:
        for member, data in {**files, name: b"x"}.items():
            out.writestr(zipfile.ZipInfo(member), data)
    assert words in refused(zipped.getvalue())


def test_nul_in_a_zip_member_name_is_refused() -> None:
    """(zipfile cuts a name at NUL as it reads it; the name as stored is what is checked.)"""
    archive = zip_archive(adapter_files() | {"README.mdZ.sh": b"#!/bin/sh"}, folder="")
    assert archive.count(b"README.mdZ.sh") == 2  # the local header and the central directory
    assert "NUL" in refused(archive.replace(b"README.mdZ.sh", b"README.md\x00.sh"))


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        (tarfile.SYMTYPE, "/etc/passwd"),
        (tarfile.LNKTYPE, "my-adapter/adapter_config.json"),
        (tarfile.CHRTYPE, ""),
        (tarfile.FIFOTYPE, ""),
    ],
)
def test_tar_links_devices_and_fifos_are_refused(kind: bytes, target: str) -> None:
    files = adapter_files()
    message = refused(tar_archive(files, links={"README.md": (kind, target)}))
    assert "only files are taken" in message


def test_zip_symlink_entries_are_refused() -> None:
    archive = zip_archive(adapter_files(), symlinks={"README.md": "/etc/passwd"})
    assert "is a link" in refused(archive)


def test_a_member_twice_and_missing_files_are_refused() -> None:
    files = adapter_files()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [*files.items(), ("adapter_config.json", files["adapter_config.json"])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert "twice" in refused(buffer.getvalue())
    assert "no adapter_model.safetensors" in refused(tar_archive({"adapter_config.json": b"{}"}))
    assert "no adapter_config.json and no" in refused(zip_archive({"README.md": b"hi"}))


@pytest.mark.parametrize(
    "data", [b"", b"just some text", b"\x89PNG\r\n\x1a\n" + b"\x00" * 600, b"{}\n" * 200], ids=str
)
def test_what_is_not_an_archive_is_415(data: bytes) -> None:
    refused(data, UnsupportedMedia)


def test_truncated_or_corrupt_archives_are_422() -> None:
    files = adapter_files()
    for archive in (tar_archive(files), tar_archive(files, gz=False), zip_archive(files)):
        refused(archive[: len(archive) // 2])
    corrupt = bytearray(zip_archive(files))
    corrupt[100:140] = b"\xff" * 40  # inside the first entry's deflated data
    refused(bytes(corrupt))


def test_past_the_cap_unpacked_is_413_and_a_bomb_is_never_unpacked_whole() -> None:
    files = adapter_files()
    size = sum(len(d) for d in files.values())
    refused(tar_archive(files), PayloadTooLarge, max_bytes=size // 2)
    refused(zip_archive(files), PayloadTooLarge, max_bytes=size // 2)
    bomb = gzip.compress(b"\x00" * (64 * MiB), compresslevel=9)  # 64 KiB packed
    assert len(bomb) < MiB
    refused(bomb, PayloadTooLarge, max_bytes=MiB)
    # A zip that declares 1000 bytes for entries that hold far more: read no further than that.
    message = refused(lying_zip(files, declared=1000))
    assert "corrupt" in message or "size" in message


# ---- adapter_config.json -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ({"r": 0}, "r (the rank)"),
        ({"r": 65}, "r (the rank)"),
        ({"r": 8.0}, "r (the rank)"),
        ({"r": True}, "r (the rank)"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": "16"}, "lora_alpha"),
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
        ({"target_modules": ".*proj"}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"task_type": "CAUSAL\x00LM"}, "NUL"),
    ],
)
def test_configs_that_are_not_a_plain_lora_of_this_base(change: dict[str, Any], words: str) -> None:
    config = adapter_config() | change
    assert words in refused(tar_archive(adapter_files(config=config)))


def test_config_json_that_is_not_strict_json_is_refused() -> None:
    files = adapter_files()
    for text in (
        b"not json",
        b"[1, 2]",
        b'{"r": 8, "r": 9}',
        b'{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}',
    ):
        assert "adapter_config.json" in refused(tar_archive(files | {"adapter_config.json": text}))


def test_a_rank_past_the_deployments_limit_is_refused() -> None:
    archive = tar_archive(adapter_files(rank=16))
    assert check(archive, max_rank=16).rank == 16
    assert "from 1 to 8" in refused(archive, max_rank=8)


# ---- adapter_model.safetensors -----------------------------------------------------------------


def weights_refused(weights: bytes, **config: Any) -> str:
    return refused(tar_archive(adapter_files(weights=weights, config=adapter_config(**config))))


def test_tensors_shaped_for_another_base_are_refused() -> None:
    wider = {name: (1152 if i == 640 else i, 1152 if o == 640 else o) for name, (i, o) in SHAPES.items()}
    message = weights_refused(safetensors(lora_tensors(shapes=wider)))
    assert "[8, 1152]" in message and "[8, 640]" in message
    assert "layer 18" in weights_refused(safetensors(lora_tensors(layers=19)))


def test_wrong_shapes_ranks_and_missing_halves_are_refused() -> None:
    tensors = lora_tensors()
    name = "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"
    dtype, _, raw = tensors[name]
    assert "needs [256, 8]" in weights_refused(safetensors(tensors | {name: (dtype, [128, 16], raw)}))
    assert "needs" in weights_refused(safetensors(lora_tensors(rank=4)))  # the config says r=8
    del tensors[name]
    assert "has no lora_B" in weights_refused(safetensors(tensors))
    # Tensors for a projection the config does not name.
    message = weights_refused(safetensors(lora_tensors(modules=["q_proj", "v_proj", "k_proj"])))
    assert "target_modules" in message


@pytest.mark.parametrize(
    "name",
    [
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
        "base_model.model.model.layers.00.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
    ],
)
def test_tensors_that_are_not_lora_weights_are_refused(name: str) -> None:
    extra = {name: ("F32", [8, 640], b"\x00" * (8 * 640 * 4))}
    weights_refused(safetensors(lora_tensors() | extra))


def test_lying_safetensors_headers_are_refused() -> None:
    tensors = lora_tensors(layers=1, modules=["q_proj"])
    good = safetensors(tensors)
    a, b = list(tensors)
    header: dict[str, Any] = {
        a: {"dtype": "F32", "shape": [8, 640], "data_offsets": [0, 20480]},
        b: {"dtype": "F32", "shape": [1024, 8], "data_offsets": [20480, 53248]},
    }
    data = good[8 + struct.unpack("<Q", good[:8])[0] :]

    def with_header(changed: dict[str, Any], body: bytes = data) -> str:
        return refused(tar_archive(adapter_files(weights=safetensors({}, header=changed) + body,
                                                 config=adapter_config(modules=["q_proj"]))))  # fmt: skip

    assert check(tar_archive(adapter_files(weights=safetensors({}, header=header) + data,
                                           config=adapter_config(modules=["q_proj"])))).rank == 8  # fmt: skip
    overlap = json.loads(json.dumps(header))
    overlap[b]["data_offsets"] = [20476, 53244]
    assert "overlaps" in with_header(overlap)
    gap = json.loads(json.dumps(header))
    gap[b]["data_offsets"] = [20484, 53252]
    assert "gap" in with_header(gap, data + b"\x00" * 4)
    assert "after the last tensor" in with_header(header, data + b"\x00" * 8)
    past = json.loads(json.dumps(header))
    past[b]["data_offsets"] = [20480, 53248 + 4096]
    assert "out of the file's data" in with_header(past)
    wrong_size = json.loads(json.dumps(header))
    wrong_size[a]["shape"] = [8, 320]
    assert "do not hold" in with_header(wrong_size)
    f64 = json.loads(json.dumps(header))
    f64[a]["dtype"] = "F64"
    assert "dtype" in with_header(f64)
    assert "dtype" in with_header({**header, a: {**header[a], "dtype": "I8"}})
    extra_key = json.loads(json.dumps(header))
    extra_key[a]["offset"] = 0
    assert "nothing else" in with_header(extra_key)
    assert "__metadata__" in with_header({**header, "__metadata__": {"n": 1}})
    for broken in (b"\xff" * 8 + data, struct.pack("<Q", 4) + b"[1, ", b"\x00\x00"):
        weights_refused(broken, modules=["q_proj"])
    duplicate = b'{"a": 1, "a": 2}'
    weights_refused(struct.pack("<Q", len(duplicate)) + duplicate, modules=["q_proj"])


def test_no_file_is_written_while_checking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    hostile = tar_archive(adapter_files(), links={"README.md": (tarfile.SYMTYPE, "/etc/passwd")})
    refused(hostile)
    check(tar_archive(adapter_files()))
    assert list(tmp_path.iterdir()) == []


def test_shapes_are_data() -> None:
    shapes = lora_shapes(
        {"num_layers": 2, "hidden": 4, "q_out": 8, "kv_out": 2, "intermediate": 16, "cache_mb": 1}
    )
    assert shapes == LoraShapes(
        num_layers=2,
        modules={"q_proj": (4, 8), "k_proj": (4, 2), "v_proj": (4, 2), "o_proj": (8, 4), "gate_proj": (4, 16),
                 "up_proj": (4, 16), "down_proj": (16, 4)},
    )  # fmt: skip

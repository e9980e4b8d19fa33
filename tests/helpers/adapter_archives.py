"""LoRA adapter uploads made in pure Python (no torch, no safetensors package): a safetensors file
written byte by byte, PEFT's adapter_config.json, and tar, tar.gz or zip archives of them, well
formed or hostile."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Gemma 3 270M: 18 layers, hidden 640, 4 query heads and 1 key-value head of 256, MLP 2048.
LAYERS = 18
SHAPES = {
    "q_proj": (640, 1024),
    "k_proj": (640, 256),
    "v_proj": (640, 256),
    "o_proj": (1024, 640),
    "gate_proj": (640, 2048),
    "up_proj": (640, 2048),
    "down_proj": (2048, 640),
}
PREFIX = "base_model.model.model.layers"
MODULES = ("q_proj", "v_proj")
Tensors = dict[str, tuple[str, list[int], bytes]]  # name → (dtype, shape, bytes)


def safetensors(tensors: Mapping[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None,
                header: dict[str, Any] | None = None) -> bytes:  # fmt: skip
    """The safetensors format: the header's length (8 bytes, little-endian), the JSON header (each
    tensor's dtype, shape and offsets into the data), then the data. `header`: written as given
    instead of the one the tensors make (a lying header)."""
    made: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
    data, offset = [], 0
    for name, (dtype, shape, raw) in tensors.items():
        made[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header if header is not None else made).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def lora_tensors(
    *,
    rank: int = 8,
    modules: Iterable[str] = MODULES,
    layers: int = LAYERS,
    shapes: Mapping[str, tuple[int, int]] = SHAPES,
    prefix: str = PREFIX,
    seed: int = 0,
) -> Tensors:
    """lora_A [r, in] and lora_B [out, r] of each module in every layer, random float32."""
    rng = np.random.default_rng(seed)
    out: Tensors = {}
    for layer in range(layers):
        for module in modules:
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            n_in, n_out = shapes[module]
            for half, shape in (("A", [rank, n_in]), ("B", [n_out, rank])):
                values = (rng.standard_normal(shape) * 0.01).astype("<f4").tobytes()
                out[f"{prefix}.{layer}.{block}.{module}.lora_{half}.weight"] = ("F32", shape, values)
    return out


def adapter_config(
    *, rank: int = 8, alpha: float = 16, modules: Iterable[str] = MODULES, **more: Any
) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules),
            "bias": "none", "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "modules_to_save": None,
            "use_dora": False, "use_rslora": False, "base_model_name_or_path": "google/gemma-3-270m",
            **more}  # fmt: skip


def adapter_files(
    *, config: dict[str, Any] | None = None, weights: bytes | None = None, **lora: Any
) -> dict[str, bytes]:
    """PEFT's two files, for rank and modules as `lora` says (lora_tensors' keywords)."""
    rank, modules = lora.get("rank", 8), lora.get("modules", MODULES)
    config = config if config is not None else adapter_config(rank=rank, modules=modules)
    weights = weights if weights is not None else safetensors(lora_tensors(**lora))
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": weights}


def tar_archive(files: Mapping[str, bytes], *, folder: str = "my-adapter", gz: bool = True,
                links: Mapping[str, tuple[bytes, str]] | None = None) -> bytes:  # fmt: skip
    """The files in a tar (gzipped with `gz`), under `folder` ("" for none), names as given after
    it; `links`: name → (tar member type, target), e.g. a symlink."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        if folder:
            directory = tarfile.TarInfo(folder)
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def zip_archive(files: Mapping[str, bytes], *, folder: str = "my-adapter",
                symlinks: Mapping[str, str] | None = None) -> bytes:  # fmt: skip
    """The files in a deflated zip under `folder`; `symlinks`: name → target, as entries with a
    unix symlink mode (what `zip --symlinks` writes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(f"{folder}/{name}" if folder else name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(f"{folder}/{name}" if folder else name)
            info.create_system = 3
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def lying_zip(files: Mapping[str, bytes], declared: int) -> bytes:
    """A zip whose every entry declares `declared` bytes unpacked, whatever it really holds (a bomb
    that hides its size): the field is rewritten in each local header and central directory entry."""
    data = bytearray(zip_archive(files, folder=""))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        local = [info.header_offset for info in archive.infolist()]
        central = archive.start_dir
    for at in local:
        data[at + 22 : at + 26] = struct.pack("<I", declared)
    for _ in local:
        assert data[central : central + 4] == b"PK\x01\x02"
        data[central + 24 : central + 28] = struct.pack("<I", declared)
        names, extra, comment = struct.unpack("<HHH", data[central + 28 : central + 34])
        central += 46 + names + extra + comment
    return bytes(data)

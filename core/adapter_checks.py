"""LoRA adapters as tenants upload them, checked with no model and no torch.

An upload is PEFT's output for one adapter: `adapter_config.json` and
`adapter_model.safetensors` (README.md and .gitattributes are let through unread), in a tar
(optionally gzipped) or a zip archive, at the top or in one folder. The archive is read in memory
only, never extracted: a member that names a path outside it (absolute, `..`, a backslash, NUL),
a link, a device or a fifo, any other file (a pickle above all: loading one runs code) is
refused, and no more than the cap is ever decompressed. The config must be a plain LoRA (no DoRA,
no bias, no modules to save); the safetensors header (8 bytes of little-endian length, then a
JSON map of tensor name to dtype, shape and data offsets) is parsed here, and every tensor must
be a `lora_A` [r, in] or `lora_B` [out, r] of a projection of the base variant, shaped as the base
variant's decoder is (`LoraShapes`, from the variant's `lora` table in core/variants.toml).
"""

from __future__ import annotations

import io
import json
import lzma
import math
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import PayloadTooLarge, UnsupportedMedia, ValidationFailed
from core.text_checks import text_problem
from core.variants import Variant

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
EXTRAS = frozenset({"README.md", ".gitattributes"})  # let through, never read
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # as the safetensors format itself caps it
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# The projections of a decoder layer an adapter may target, and the block that holds each.
PARENTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# PEFT's tensor names: a causal LM's (`model.layers`), a multimodal checkpoint's language model
# (`model.language_model.layers`), or a bare decoder's.
TENSOR_NAME = re.compile(
    r"base_model\.model\.(?:model\.)?(?:language_model\.)?layers\.(0|[1-9][0-9]{0,5})\."
    r"(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight"
)
# Config keys that change what the tensors mean, or add tensors of other kinds: refused when set.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save (whole modules trained beside the LoRA) are not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D layers) are not supported",
    "layer_replication": "layer_replication is not supported",
    "lora_bias": "a bias on lora_B is not supported",
    "target_parameters": "target_parameters are not supported",
    "trainable_token_indices": "trainable tokens are not supported",
}


@dataclass(frozen=True)
class LoraShapes:
    """The base variant's decoder as an adapter sees it: its layers, and per projection its
    (in_features, out_features)."""

    num_layers: int
    modules: Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class CheckedAdapter:
    rank: int
    alpha: float
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora
    target_modules: tuple[str, ...]  # sorted
    config: dict[str, Any]  # adapter_config.json as uploaded
    weights: bytes  # adapter_model.safetensors as uploaded


def lora_shapes(table: Mapping[str, Any]) -> LoraShapes:
    """The shapes from a variant's `lora` table (num_layers, hidden, q_out: attention heads x head
    size, kv_out: key-value heads x head size, intermediate); other keys are ignored."""
    dims = {}
    for key in ("num_layers", "hidden", "q_out", "kv_out", "intermediate"):
        value = table.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"lora table: {key} must be a positive integer, not {value!r}")
        dims[key] = value
    hidden, q_out, kv_out, inter = dims["hidden"], dims["q_out"], dims["kv_out"], dims["intermediate"]
    return LoraShapes(
        num_layers=dims["num_layers"],
        modules={
            "q_proj": (hidden, q_out),
            "k_proj": (hidden, kv_out),
            "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        },
    )


def shapes_for(variant: Variant) -> LoraShapes | None:
    """What adapters of `variant` must be shaped as; None when it takes no adapters."""
    return None if variant.lora is None else lora_shapes(variant.lora.model_dump())


def check_adapter(
    archive: bytes, *, base: str, shapes: LoraShapes, max_rank: int, max_bytes: int
) -> CheckedAdapter:
    """The adapter in `archive` for the variant `base`, checked; ValidationFailed (422),
    UnsupportedMedia (415, not an archive) or PayloadTooLarge (413, past `max_bytes` unpacked)
    otherwise."""
    members = _read_archive(archive, max_bytes)
    missing = [name for name in (CONFIG, WEIGHTS) if name not in members]
    if missing:
        raise ValidationFailed(f"file: the archive has no {' and no '.join(missing)}", {"missing": missing})
    config = _parse_config(members[CONFIG])
    rank, alpha, scale, targets = _check_config(config, shapes, max_rank)
    tensors = _parse_safetensors(members[WEIGHTS])
    found = _check_tensors(tensors, shapes, rank, base)
    if found != set(targets):
        raise ValidationFailed(
            f"{WEIGHTS}: the tensors adapt {sorted(found)}, but target_modules names {sorted(targets)}",
            {"tensors": sorted(found), "target_modules": sorted(targets)},
        )
    return CheckedAdapter(
        rank=rank,
        alpha=alpha,
        scale=scale,
        target_modules=tuple(sorted(targets)),
        config=config,
        weights=members[WEIGHTS],
    )


# ---- the archive ------------------------------------------------------------------------------


def _read_archive(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """The adapter's two files from a tar, tar.gz or zip archive, by their names without the
    archive's folder; every member checked before any is read."""
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        reader: Callable[[bytes, int], dict[str, bytes]] = _read_zip
    elif data.startswith(b"\x1f\x8b"):
        data, reader = _gunzip(data, max_bytes), _read_tar
    elif data[257:262] == b"ustar":
        reader = _read_tar
    else:
        raise UnsupportedMedia("file: not a tar, tar.gz or zip archive")
    try:
        return reader(data, max_bytes)
    except (
        tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, struct.error,
        ValueError, OverflowError,
    ) as exc:  # fmt: skip
        raise ValidationFailed(f"file: the archive is truncated or corrupt ({type(exc).__name__})") from exc
    except (NotImplementedError, RuntimeError) as exc:  # zip: an unknown compression, encryption
        raise ValidationFailed(f"file: an archive member cannot be read: {exc}") from exc


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """The gzip stream decompressed, never past `max_bytes` (a bomb stops there)."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise ValidationFailed("file: the gzip stream is corrupt") from exc
    if len(out) > max_bytes:
        raise _too_large(max_bytes)
    if not inflate.eof:
        raise ValidationFailed("file: the gzip stream is truncated")
    return out


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"file: the adapter unpacks to more than {max_bytes} bytes", {"limit": max_bytes})


def _label(name: str) -> str:
    return repr(name if len(name) <= 100 else name[:100] + "…")


def _member_name(raw: str, is_dir: bool, folder: list[str | None]) -> str | None:
    """The file name a member stands for (None: a folder), after refusing every path that could
    point outside the archive or that the adapter has no use for. `folder`: the one leading
    folder the archive's files share, once seen."""
    where = f"file: member {_label(raw)}"
    if "\x00" in raw or "\\" in raw:
        raise ValidationFailed(f"{where}: NUL and backslash are not allowed in a path")
    if raw.startswith("/") or re.match(r"[A-Za-z]:", raw):
        raise ValidationFailed(f"{where}: absolute paths are not allowed")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValidationFailed(f"{where}: '..' is not allowed in a path")
    if not parts or (is_dir and len(parts) == 1):
        return None  # the archive's root, or its one folder
    if is_dir or len(parts) > 2:
        raise ValidationFailed(f"{where}: nested folders are not allowed (at most one leading folder)")
    name = parts[-1]
    if name.lower().endswith(PICKLES):
        raise ValidationFailed(
            f"{where}: pickle files are refused (loading one runs code); only safetensors weights "
            f"({WEIGHTS}) are taken",
            {"member": name},
        )
    if name not in (CONFIG, WEIGHTS) and name not in EXTRAS:
        raise ValidationFailed(
            f"{where}: an adapter archive holds {CONFIG} and {WEIGHTS} only "
            f"(and {', '.join(sorted(EXTRAS))})",
            {"member": name},
        )
    leading = parts[0] if len(parts) == 2 else ""
    if folder[0] is None:
        folder[0] = leading
    elif folder[0] != leading:
        raise ValidationFailed(f"{where}: the adapter's files must all be in one folder")
    return name


def _tally(name: str, size: int, seen: set[str], total: int, max_bytes: int) -> int:
    if name in seen:
        raise ValidationFailed(f"file: {name} appears twice in the archive")
    seen.add(name)
    total += size
    if total > max_bytes:
        raise _too_large(max_bytes)
    return total


def _read_tar(data: bytes, max_bytes: int) -> dict[str, bytes]:
    wanted: list[tuple[str, tarfile.TarInfo]] = []
    seen: set[str] = set()
    folder: list[str | None] = [None]
    total = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not (member.isreg() or member.isdir()) or member.issparse():
                kind = "link" if member.issym() or member.islnk() else "device, fifo or special file"
                raise ValidationFailed(
                    f"file: member {_label(member.name)} is a {kind}; only files are taken"
                )
            name = _member_name(member.name, member.isdir(), folder)
            if name is None:
                continue
            total = _tally(name, member.size, seen, total, max_bytes)
            if name in (CONFIG, WEIGHTS):
                wanted.append((name, member))
        out = {}
        for name, member in wanted:  # sizes all checked: read now, in memory
            handle = tar.extractfile(member)
            assert handle is not None  # a regular file
            out[name] = handle.read(member.size)
            if len(out[name]) != member.size:
                raise ValidationFailed(f"file: {name} is truncated in the archive")
    return out


def _read_zip(data: bytes, max_bytes: int) -> dict[str, bytes]:
    wanted: list[tuple[str, zipfile.ZipInfo]] = []
    seen: set[str] = set()
    folder: list[str | None] = [None]
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            kind = (info.external_attr >> 16) & 0o170000
            if kind not in (0, 0o100000, 0o040000):  # unix mode bits: a link, a device, a fifo
                what = "link" if kind == 0o120000 else "device, fifo or special file"
                raise ValidationFailed(
                    f"file: member {_label(info.orig_filename)} is a {what}; only files are taken"
                )
            name = _member_name(info.orig_filename, info.is_dir(), folder)
            if name is None:
                continue
            if info.flag_bits & 0x1:
                raise ValidationFailed(f"file: {name} is encrypted")
            total = _tally(name, info.file_size, seen, total, max_bytes)
            if name in (CONFIG, WEIGHTS):
                wanted.append((name, info))
        out = {}
        for name, info in wanted:
            with archive.open(info) as handle:  # never more than it declares (a bomb stops there)
                out[name] = handle.read(info.file_size + 1)
            if len(out[name]) != info.file_size:
                raise ValidationFailed(f"file: {name} is not the size the archive declares")
    return out


# ---- adapter_config.json -----------------------------------------------------------------------


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(data: bytes) -> Any:
    """Strict JSON: no key twice in an object, no NaN or Infinity."""
    return json.loads(data.decode("utf-8"), object_pairs_hook=_strict_object, parse_constant=_no_constant)


def _parse_config(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_CONFIG_BYTES:
        raise ValidationFailed(f"{CONFIG}: more than {MAX_CONFIG_BYTES} bytes")
    try:
        config = _json(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValidationFailed(f"{CONFIG}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValidationFailed(f"{CONFIG}: not a JSON object")
    problem = text_problem(config, CONFIG)  # it is stored as jsonb: text only
    if problem:
        raise ValidationFailed(problem if len(problem) <= 300 else problem[:300] + "…")
    return config


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_config(
    config: dict[str, Any], shapes: LoraShapes, max_rank: int
) -> tuple[int, float, float, list[str]]:
    """rank, alpha, scale and target modules; `base_model_name_or_path` is never trusted."""
    if config.get("peft_type") != "LORA":
        raise ValidationFailed(
            f"{CONFIG}: peft_type must be 'LORA'", {"peft_type": str(config.get("peft_type"))[:100]}
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise ValidationFailed(
            f"{CONFIG}: r (the rank) must be an integer from 1 to {max_rank}", {"max_rank": max_rank}
        )
    alpha: Any = config.get("lora_alpha")
    if not _number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ValidationFailed(f"{CONFIG}: lora_alpha must be a number above 0")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise ValidationFailed(f"{CONFIG}: {why}", {"key": key})
    if config.get("bias", "none") != "none":
        raise ValidationFailed(f"{CONFIG}: bias must be 'none' (trained biases are not supported)")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValidationFailed(f"{CONFIG}: use_rslora must be true or false")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    allowed = sorted(shapes.modules)
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t in shapes.modules for t in targets)
        or len(set(targets)) != len(targets)
    ):
        raise ValidationFailed(
            f"{CONFIG}: target_modules must list projection names, each one of {allowed}",
            {"allowed": allowed},
        )
    return rank, float(alpha), scale_of(config), targets


def scale_of(config: Mapping[str, Any]) -> float:
    """What an adapter's output is scaled by, from its (checked) config: lora_alpha / r, or
    lora_alpha / sqrt(r) with use_rslora."""
    rank, alpha = config["r"], float(config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


# ---- adapter_model.safetensors -----------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]


def _parse_safetensors(data: bytes) -> list[Tensor]:
    """The tensors a safetensors file declares, once its header is checked against its bytes:
    known dtypes, data offsets in range and covering the data exactly, in order, none overlapping."""
    if len(data) < 8:
        raise ValidationFailed(f"{WEIGHTS}: too short to be safetensors")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(MAX_HEADER_BYTES, len(data) - 8):
        raise ValidationFailed(f"{WEIGHTS}: the header length is past the end of the file")
    try:
        header = _json(data[8 : 8 + length])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValidationFailed(f"{WEIGHTS}: the header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValidationFailed(f"{WEIGHTS}: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValidationFailed(f"{WEIGHTS}: __metadata__ must map names to strings")
    buffer = len(data) - 8 - length
    spans, tensors = [], []
    for name, info in header.items():
        where = f"{WEIGHTS}: tensor {_label(name)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValidationFailed(f"{where}: needs dtype, shape and data_offsets, nothing else")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ValidationFailed(
                f"{where}: dtype {_label(str(dtype))}; one of {sorted(DTYPE_BYTES)} is taken"
            )
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise ValidationFailed(f"{where}: shape must be a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
            raise ValidationFailed(f"{where}: data_offsets must be [begin, end]")
        begin, end = offsets
        if not begin <= end <= buffer:
            raise ValidationFailed(f"{where}: data_offsets {offsets} are out of the file's data")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ValidationFailed(f"{where}: data_offsets do not hold a {dtype} tensor of shape {shape}")
        spans.append((begin, end, name))
        tensors.append(Tensor(name=name, dtype=dtype, shape=tuple(shape)))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps another" if begin < position else "leaves a gap before it"
            raise ValidationFailed(f"{WEIGHTS}: tensor {_label(name)} {problem}")
        position = end
    if position != buffer:
        raise ValidationFailed(f"{WEIGHTS}: {buffer - position} bytes after the last tensor")
    return tensors


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def _check_tensors(tensors: list[Tensor], shapes: LoraShapes, rank: int, base: str) -> set[str]:
    """Every tensor a lora_A [r, in] or lora_B [out, r] of a projection of the base, both of each
    pair present; returns the projections adapted."""
    if not tensors:
        raise ValidationFailed(f"{WEIGHTS}: no tensors")
    halves: dict[tuple[int, str], set[str]] = {}
    for tensor in tensors:
        where = f"{WEIGHTS}: tensor {_label(tensor.name)}"
        match = TENSOR_NAME.fullmatch(tensor.name)
        if match is None:
            raise ValidationFailed(
                f"{where} is not a LoRA weight (base_model.model.model.layers.N.<self_attn|mlp>."
                "<projection>.lora_<A|B>.weight)"
            )
        layer, parent, module, half = int(match[1]), match[2], match[3], match[4]
        if PARENTS.get(module) != parent or module not in shapes.modules:
            raise ValidationFailed(f"{where}: {parent}.{module} is not a projection an adapter may target")
        if layer >= shapes.num_layers:
            raise ValidationFailed(
                f"{where}: layer {layer}; {base} has {shapes.num_layers}", {"layers": shapes.num_layers}
            )
        features_in, features_out = shapes.modules[module]
        expected = [rank, features_in] if half == "A" else [features_out, rank]
        if list(tensor.shape) != expected:
            raise ValidationFailed(
                f"{where}: shape {list(tensor.shape)}; {base} with r={rank} needs {expected}",
                {"shape": list(tensor.shape), "expected": expected},
            )
        got = halves.setdefault((layer, module), set())
        if half in got:
            raise ValidationFailed(f"{where}: a second lora_{half} of layer {layer}'s {module}")
        got.add(half)
    for (layer, module), got in sorted(halves.items()):
        if got != {"A", "B"}:
            lacking = "B" if "A" in got else "A"
            raise ValidationFailed(f"{WEIGHTS}: layer {layer}'s {module} has no lora_{lacking}")
    return {module for _, module in halves}

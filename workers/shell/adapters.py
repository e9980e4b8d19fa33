"""A job's LoRA adapter, made ready for the engine: its weights, read from PostgreSQL once, kept in
a file of the model cache named by the adapter and its digest, which the engine reads off its
device's thread (workers.engine.lora)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from core.adapter_checks import scale_of
from db.repo import adapters as adapters_repo
from db.session import sync_sessionmaker
from workers.shared.base import AdapterRef, RequestError


def adapter_ref(*, db_url: str, cache_root: Path, adapter_id: str, user_id: str) -> AdapterRef:
    """The adapter the job's owner may use (theirs or a public one), its weights on local disk.
    Raises RequestError when it is gone (deleted since the job was queued)."""
    with sync_sessionmaker(db_url)() as session:
        found = adapters_repo.digest(session=session, adapter_id=adapter_id, user_id=user_id)
        if found is None:
            raise RequestError(f"adapter {adapter_id!r} is gone")
        sha256, config = found
        folder = cache_root / "adapters"
        path = folder / f"{adapter_id}-{sha256[:16]}.safetensors"
        if not path.exists():
            read = adapters_repo.read_adapter(session=session, adapter_id=adapter_id)
            if read is None:
                raise RequestError(f"adapter {adapter_id!r} is gone")
            weights = read[1]
            if hashlib.sha256(weights).hexdigest() != sha256:
                raise RequestError(f"adapter {adapter_id!r} changed while it was read")
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{path.name}.{os.getpid()}"
            partial.write_bytes(weights)
            partial.replace(path)  # whole or absent: another worker may write the same file
    return AdapterRef(id=adapter_id, sha256=sha256, path=str(path), scale=scale_of(config))

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, LargeBinary, String, UniqueConstraint, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, deferred, mapped_column

from db.base import Base
from db.ids import new_id


class Adapter(Base):
    """A PEFT LoRA adapter of a text variant (`base`), uploaded by its owner and checked by the API
    (core/adapter_checks.py); its weights live in PostgreSQL. Seen by its owner, and by every
    tenant once an admin makes it `public`. It never expires; it counts toward its owner's storage
    quota (bytes and files) until deleted."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("user_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=partial(new_id, "adapter"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))  # core.schemas.ADAPTER_NAME, unique per owner
    base: Mapped[str] = mapped_column(String(64))  # the variant it adapts
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float]
    target_modules: Mapped[list[str]] = mapped_column(JSONB)  # sorted
    config: Mapped[dict[str, Any]]  # adapter_config.json as uploaded
    # adapter_model.safetensors as uploaded; read by workers only (db.repo.adapters.read_adapter).
    weights: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    size: Mapped[int] = mapped_column("bytes", BigInteger)  # the weights and the config's JSON
    sha256: Mapped[str] = mapped_column(String(64))  # of the weights
    public: Mapped[bool] = mapped_column(default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

"""LoRA adapters: PEFT adapters of a text variant, uploaded by a tenant, checked here with no model
(core/adapter_checks.py) and stored in PostgreSQL. An adapter is seen by its owner, and by every
tenant once an admin publishes it; anyone else gets 404."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, UploadFile, status
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from api import admission
from api.deps import SessionMakerDep, SettingsDep, SubmitterDep, UserDep, VariantsDep
from api.errors import responses
from api.media_admission import read_capped
from api.routers.admin import AdminDep
from api.schemas import AdapterDeleted, AdapterList, AdapterOut, adapter_out
from core import quotas
from core.adapter_checks import check_adapter, shapes_for
from core.errors import Conflict, NotFound, UnknownVariant, ValidationFailed
from core.schemas import ADAPTER_NAME
from db.repo import adapters as adapters_repo
from db.repo import files as files_repo

router = APIRouter(tags=["adapters"])


def _taken(name: str) -> Conflict:
    return Conflict(f"you have an adapter named {name!r} already", {"name": name})


@router.post(
    "/adapters",
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 409, 413, 415, 422, 429),
    summary="Upload a LoRA adapter (multipart)",
)
async def upload_adapter(
    file: UploadFile,
    name: Annotated[
        str, Form(min_length=1, max_length=64, pattern=ADAPTER_NAME, description="unique among yours")
    ],
    base: Annotated[str, Form(min_length=1, max_length=64, description="the variant it adapts")],
    user: UserDep,
    maker: SessionMakerDep,
    settings: SettingsDep,
    variants: VariantsDep,
    submitter: SubmitterDep,
) -> AdapterOut:
    """`file`: a tar, tar.gz or zip of PEFT's `adapter_config.json` and
    `adapter_model.safetensors` (at the top or in one folder), read no further than
    `adapters_max_bytes`. Checked without a model: a plain LoRA of rank up to `adapters_max_rank`
    whose every tensor fits the base variant's projections; pickles, links and paths out of the
    archive are refused. The adapter counts toward its owner's storage quota (bytes and files)
    until deleted."""
    variant = variants.get(base)
    if variant is None:
        raise UnknownVariant(f"unknown variant {base!r}", {"variant": base, "variants": variants.names()})
    shapes = shapes_for(variant)
    if shapes is None:
        taking = [v.name for v in variants if v.lora is not None]
        raise ValidationFailed(
            f"variant {base!r} takes no LoRA adapters; variants that do: {taking}",
            {"variant": base, "variants": taking},
        )
    async with maker() as session:  # before the upload is read: a taken name costs nothing more
        if await adapters_repo.name_taken(session=session, user_id=user.id, name=name):
            raise _taken(name)
    data = await read_capped(file, settings.adapters_max_bytes)
    async with submitter.costly.turn(user.id):
        checked = await run_in_threadpool(
            check_adapter,
            data,
            base=base,
            shapes=shapes,
            max_rank=settings.adapters_max_rank,
            max_bytes=settings.adapters_max_bytes,
        )
    limits = admission.limits_of(user, settings)
    adding = adapters_repo.stored_bytes(checked.config, checked.weights)
    try:
        async with maker() as session, session.begin():
            files, used = await files_repo.storage_used(session=session, user_id=user.id, lock=True)
            if await adapters_repo.name_taken(session=session, user_id=user.id, name=name):
                raise _taken(name)
            quotas.check_storage(limits, files=files, used=used, adding=adding)
            adapter = await adapters_repo.create(
                session=session,
                user_id=user.id,
                name=name,
                base=base,
                rank=checked.rank,
                alpha=checked.alpha,
                target_modules=checked.target_modules,
                config=checked.config,
                weights=checked.weights,
            )
    except IntegrityError as exc:  # the same name, uploaded at the same moment
        raise _taken(name) from exc
    return adapter_out(adapter, user.id)


@router.get("/adapters", responses=responses(401), summary="Your adapters, then the public ones")
async def list_adapters(user: UserDep, maker: SessionMakerDep) -> AdapterList:
    async with maker() as session:
        found = await adapters_repo.list_visible(session=session, user_id=user.id)
    return AdapterList(data=[adapter_out(a, user.id) for a in found])


@router.get("/adapters/{adapter_id}", responses=responses(401, 404), summary="An adapter")
async def get_adapter(adapter_id: str, user: UserDep, maker: SessionMakerDep) -> AdapterOut:
    async with maker() as session:
        adapter = await adapters_repo.get_visible(session=session, user_id=user.id, adapter_id=adapter_id)
    if adapter is None:
        raise NotFound(f"no adapter {adapter_id!r}")
    return adapter_out(adapter, user.id)


@router.delete("/adapters/{adapter_id}", responses=responses(401, 404), summary="Delete one of your adapters")
async def delete_adapter(adapter_id: str, user: UserDep, maker: SessionMakerDep) -> AdapterDeleted:
    async with maker() as session, session.begin():
        deleted = await adapters_repo.delete_own(session=session, user_id=user.id, adapter_id=adapter_id)
    if not deleted:
        raise NotFound(f"no adapter {adapter_id!r} of yours")
    return AdapterDeleted(id=adapter_id, deleted=True)


async def _publish(adapter_id: str, admin_id: str, maker: SessionMakerDep, public: bool) -> AdapterOut:
    async with maker() as session, session.begin():
        adapter = await adapters_repo.set_public(session=session, adapter_id=adapter_id, public=public)
        if adapter is None:
            raise NotFound(f"no adapter {adapter_id!r}")
        return adapter_out(adapter, admin_id)


@router.post(
    "/adapters/{adapter_id}/publish",
    responses=responses(401, 403, 404),
    summary="Admins: make an adapter usable by every tenant",
)
async def publish_adapter(adapter_id: str, admin: AdminDep, maker: SessionMakerDep) -> AdapterOut:
    return await _publish(adapter_id, admin.id, maker, public=True)


@router.post(
    "/adapters/{adapter_id}/unpublish",
    responses=responses(401, 403, 404),
    summary="Admins: make an adapter its owner's only again",
)
async def unpublish_adapter(adapter_id: str, admin: AdminDep, maker: SessionMakerDep) -> AdapterOut:
    return await _publish(adapter_id, admin.id, maker, public=False)

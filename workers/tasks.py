"""The one task: claim the job, hand it to the variant's batcher, write the outcome once."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
import structlog
from celery import current_task
from sqlalchemy.exc import OperationalError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from core import errors
from core.broker import enqueue_job
from core.events import add_status
from core.metrics import add_filtered
from core.queues import message_key
from core.schemas import GenerationParams, Tool
from core.tool_calls import parse_tool_calls
from db.models import Job
from db.repo import files as files_repo
from db.repo import runs
from db.repo.runs import Claimed
from db.session import autocommit_engine, sync_sessionmaker
from workers.grouped import Grouped
from workers.outcome import ended
from workers.runtime.base import EngineFailure, Request, RequestError, Result, ShuttingDown
from workers.runtime.media import file_ids, load_media
from workers.runtime.pool import VariantPool

log = structlog.get_logger(__name__)

# Set once by `workers.app.run_worker` before the worker consumes anything.
POOL: VariantPool | None = None

_db_retry = retry(
    retry=retry_if_exception_type(OperationalError),
    wait=wait_exponential(multiplier=0.5, max=10),
    stop=stop_after_delay(120),
    reraise=True,
)


def _claim_group(claiming: list[tuple[VariantPool, str]]) -> list[Claimed | None]:
    """The jobs claimed in one statement, then the markers of those taken cleared and their
    `running` events appended (one round trip)."""
    pool = claiming[0][0]
    job_ids = [job_id for _, job_id in claiming]
    with autocommit_engine(pool.settings.db_url).connect() as connection:
        jobs = runs.claim_many(session=connection, job_ids=job_ids, worker=pool.worker)
    taken = [job.id for job in jobs if job is not None]
    if taken:
        with contextlib.suppress(redis.RedisError), pool.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*(message_key(pool.settings, job_id) for job_id in taken))  # as message_taken does
            for job in jobs:
                if job is not None:
                    add_status(pipe, pool.settings, job.id, "running", expire=False, attempt=job.attempts)
            pipe.execute()
    return jobs


# Messages arrive one by one, but while a claim runs the next ones queue up: claimed as one.
_claiming: Grouped[tuple[VariantPool, str], Claimed | None] = Grouped(_claim_group)


@_db_retry
def _claim(pool: VariantPool, job_id: str) -> Claimed | None:
    """The job, taken for this worker and its message marker cleared; None when it is not queued."""
    job = _claiming((pool, job_id))
    if job is not None:
        return job
    with sync_sessionmaker(pool.settings.db_url).begin() as session:
        # Past its deadline: it expires here. Already ended: settling again is a no-op,
        # unless the worker that ended it died before it could release the quota slot.
        charges = runs.expire(session=session, job_ids=[job_id])
        if not charges and (charge := runs.terminal_charge(session=session, job_id=job_id)):
            charges = [charge]
    if charges:
        ended(pool.quotas, pool.settings, charges)
    return None


def _finish_group(finishing: list[tuple[VariantPool, runs.Outcome]]) -> list[bool]:
    """The outcomes, their usage and their metrics in one statement; then, once each, the quota
    slots released, the cancel flags cleared and the waiters woken (one Redis script)."""
    pool = finishing[0][0]
    with autocommit_engine(pool.settings.db_url).connect() as connection:
        charges = runs.finish_many(session=connection, outcomes=[outcome for _, outcome in finishing])
    written = [c for c in charges if c is not None]
    if written:
        ended(pool.quotas, pool.settings, written)
    return [c is not None for c in charges]


# The jobs of a batch end together: their task threads write their outcomes as one.
_finishing: Grouped[tuple[VariantPool, runs.Outcome], bool] = Grouped(_finish_group)


@_db_retry
def _finish(pool: VariantPool, job: Claimed, **outcome: Any) -> bool:
    """True when this call moved the job to its terminal state (False: it had left this attempt)."""
    return _finishing((pool, runs.Outcome(job_id=job.id, attempt=job.attempts, **outcome)))


@_db_retry
def _put_back(pool: VariantPool, job: Claimed) -> None:
    # Let go of the lease first, or the delivery of the message sent below would see it held.
    pool.release_lease(job.id)
    with sync_sessionmaker(pool.settings.db_url).begin() as session:
        back = runs.put_back(session=session, job_id=job.id, attempt=job.attempts)
    if back is not None:
        enqueue_job(pool.broker, job_id=job.id, variant=job.variant, priority=job.priority)
        log.info("job.returned", reason="the worker is shutting down")


@_db_retry
def _send_again(pool: VariantPool, job_id: str) -> None:
    with sync_sessionmaker(pool.settings.db_url)() as session:
        job = session.get(Job, job_id)
    if job is not None and job.status == "queued":
        enqueue_job(pool.broker, job_id=job.id, variant=job.variant, priority=job.priority)


def run_job(job_id: str) -> None:
    pool = POOL
    assert pool is not None, "the worker pool is not started"
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=job_id, worker=pool.worker)
    request = current_task.request if current_task else None
    token = pool.reserved(request.id) if request is not None and request.id else None
    if pool.draining:  # SIGTERM arrived: leave the job queued for another worker
        if token is not None:
            pool.drop_lease(job_id, token)  # or the delivery of the message sent below would skip it
        try:
            _send_again(pool, job_id)
        except Exception:
            pool.message_taken(job_id)  # no marker: the reconciler sends it
            raise
        return
    token = token or pool.take_lease(job_id)
    if token is None:
        # Another delivery holds the lease: a live one (here or on another worker) runs the job,
        # or a dead worker's lease is lapsing. Either way this message is spent: its marker goes,
        # and once no lease is left the reconciler sends the job again if it is still queued.
        pool.message_taken(job_id)
        log.info("job.skipped", reason="another delivery of this job holds its lease")
        return
    try:
        try:
            job = _claim(pool, job_id)
        except Exception:
            # The message is acked all the same: without its marker the reconciler sends it again.
            pool.message_taken(job_id)
            raise
        if job is None:
            log.info("job.skipped", reason="not queued: ended, expired or claimed by another delivery")
            return
        pool.note_claimed(job.id, job.attempts, pool.policy(job.policy))
        _run(pool, job)
    finally:
        pool.drop_lease(job_id, token)


def _run(pool: VariantPool, job: Claimed) -> None:
    structlog.contextvars.bind_contextvars(user_id=job.user_id, variant=job.variant, attempt=job.attempts)
    queue_ms = (job.started_at - job.created_at).total_seconds() * 1000
    try:
        _run_claimed(pool, job, queue_ms)
    except OperationalError:
        # The database stayed away past the retries: the task ends, the lease is dropped, and the
        # reconciler requeues the job once the lease has stayed gone for lease_s.
        raise
    except Exception as exc:
        # Whatever went wrong, a claimed job must not stay running: it fails, the worker goes on.
        log.error("job.crashed", error=type(exc).__name__)
        _fail(
            pool,
            job,
            errors.GENERATION_ERROR,
            f"the worker could not run it ({type(exc).__name__})",
            queue_ms,
        )


def _run_claimed(pool: VariantPool, job: Claimed, queue_ms: float) -> None:
    started = time.monotonic()
    variant = pool.registry.get(job.variant)
    reason = pool.unavailable(job.variant) if variant is not None else "unknown variant"
    if variant is None or reason is not None:
        _fail(pool, job, errors.GENERATION_ERROR, f"variant unavailable: {reason}", queue_ms)
        return
    try:
        request = _request(pool, job, started)
    except RequestError as exc:
        _fail(pool, job, errors.GENERATION_ERROR, str(exc), queue_ms)
        return
    future = pool.submit(job.variant, request)  # a cold variant loads first, within the limit
    limit = min(request.params.timeout_s or variant.timeout_s, variant.timeout_s)
    try:
        result = future.result(timeout=limit)
    except FutureTimeout:
        # Stop it at the engine's next step (or its first, if it has not started), then let go.
        pool.request_cancel(job.id)
        future.cancel()
        _fail(pool, job, errors.TIMEOUT, f"no result within {limit:g} s", queue_ms)
        return
    except ShuttingDown:
        _put_back(pool, job)
        return
    except RequestError as exc:
        _fail(pool, job, errors.GENERATION_ERROR, str(exc), queue_ms)
        return
    except Exception as exc:
        kind = exc.kind if isinstance(exc, EngineFailure) else type(exc).__name__
        log.error("job.generation_failed", error=kind)
        _fail(pool, job, errors.GENERATION_ERROR, f"generation failed ({kind})", queue_ms)
        return
    _succeed(pool, job, request, result, queue_ms, started)


def _request(pool: VariantPool, job: Claimed, started: float) -> Request:
    """The job as the engine takes it: media read from PostgreSQL and decoded on this thread."""
    messages = job.input.get("messages")
    tools = job.input.get("tools")
    request = Request(
        job_id=job.id,
        messages=messages,
        prompt=job.input.get("prompt"),
        params=GenerationParams.model_validate(job.params),
        started=started,
        tools=[Tool.model_validate(t) for t in tools] if tools else None,
    )
    ids = file_ids(messages or [])
    if ids:
        with sync_sessionmaker(pool.settings.db_url)() as session:
            contents = files_repo.read_contents(session=session, user_id=job.user_id, file_ids=ids)
        loaded = load_media(messages or [], contents)
        request.messages = loaded.messages
        request.images, request.audio_clips = loaded.images, loaded.audio_clips
        request.audio_seconds, request.preprocess_ms = loaded.audio_seconds, loaded.ms
    return request


def _metrics(
    pool: VariantPool, queue_ms: float, started: float, result: Result | None, request: Request | None = None
) -> dict[str, Any]:
    base: dict[str, Any] = {
        "queue_ms": round(queue_ms, 3),
        "total_ms": round(queue_ms + (time.monotonic() - started) * 1000, 3),
        "worker": pool.worker,
        "device": pool.device,
    }
    if result is None:
        return base
    seconds = result.inference_ms / 1000
    return base | {
        "load_ms": result.load_ms,
        "time_to_first_token_ms": result.time_to_first_token_ms,
        "inference_ms": round(result.inference_ms, 3),
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
        "tokens_per_second": round(result.output_tokens / seconds, 3) if seconds > 0 else None,
        "batch_size": result.batch_size,
        "peak_memory_bytes": result.peak_memory_bytes,
        "images": request.images if request else None,
        "audio_clips": request.audio_clips if request else None,
        "audio_seconds": request.audio_seconds if request else None,
        "preprocess_ms": round((request.preprocess_ms if request else 0) + result.preprocess_ms, 3),
        "grammar_compile_ms": result.grammar_compile_ms,
        "grammar_mask_ms": result.grammar_mask_ms,
    }


def _succeed(
    pool: VariantPool, job: Claimed, request: Request, result: Result, queue_ms: float, started: float
) -> None:
    category = pool.policy(job.policy).check(result.text, "output")
    if category is not None:
        _withhold(pool, job, request, result, queue_ms, started, category)
        return
    pool.release_held(job.id)  # the streamed text held back, before the job's end is published
    cancelled = result.finish_reason == "cancelled"
    finish_reason: str = result.finish_reason
    tool_calls = None
    if request.tools and request.params.tool_choice != "none" and not cancelled:
        calls, attempted = parse_tool_calls(result.text, request.tools)
        if calls:
            tool_calls, finish_reason = calls, "tool_calls"
        elif attempted:
            finish_reason = "tool_call_unparsed"
    body = {
        "text": result.text,
        "finish_reason": finish_reason,
        "tool_calls": tool_calls,
        "usage": {"input_tokens": result.input_tokens, "output_tokens": result.output_tokens},
    }
    for name in ("segments", "language"):  # speech with params.timestamps
        if name in result.extra:
            body[name] = result.extra[name]
    error = {"code": errors.CANCELLED, "message": "cancelled while running"} if cancelled else None
    metrics = _metrics(pool, queue_ms, started, result, request)
    written = _finish(
        pool, job, status="cancelled" if cancelled else "succeeded", result=body, error=error, metrics=metrics
    )
    log.info(
        "job.finished",
        status="cancelled" if cancelled else "succeeded",
        written=written,
        output_tokens=result.output_tokens,
        tokens_per_second=metrics["tokens_per_second"],
        batch_size=result.batch_size,
        cancel_lag_steps=result.cancel_lag_steps,
    )


def _withhold(
    pool: VariantPool,
    job: Claimed,
    request: Request,
    result: Result,
    queue_ms: float,
    started: float,
    category: str,
) -> None:
    """The output fell in a moderation category: the job fails RESPONSE_FILTERED, its text is not
    stored (nor was any of it streamed past the filter), its usage is charged as it was spent."""
    body = {
        "text": "",
        "finish_reason": "content_filter",
        "tool_calls": None,
        "usage": {"input_tokens": result.input_tokens, "output_tokens": result.output_tokens},
    }
    error = {
        "code": errors.RESPONSE_FILTERED,
        "message": f"the output fell in the content policy's category {category!r} and is withheld",
    }
    metrics = _metrics(pool, queue_ms, started, result, request)
    written = _finish(pool, job, status="failed", result=body, error=error, metrics=metrics)
    with contextlib.suppress(redis.RedisError), pool.redis.pipeline(transaction=False) as pipe:
        add_filtered(pipe, pool.settings, job.user_id, "output", category)
        pipe.execute()
    log.warning("job.filtered", stage="output", category=category, written=written)


def _fail(pool: VariantPool, job: Claimed, code: str, message: str, queue_ms: float) -> None:
    metrics = _metrics(pool, queue_ms, time.monotonic(), None)
    error = {"code": code, "message": message}
    written = _finish(pool, job, status="failed", result=None, error=error, metrics=metrics)
    log.warning("job.failed", code=code, written=written)

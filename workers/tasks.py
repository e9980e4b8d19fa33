"""The one task, `run_job(ctx, job_id)`: claim the job, hand it to its variant's engine, end it once.

`claim` and `finish` are the two writes every job makes; `WorkerContext` is the state the
worker's task threads share, built once when the worker starts (workers/app.py)."""

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

from core import errors, moderation
from core.broker import enqueue_again
from core.events import add_status
from core.keys import message_key
from core.metrics import add_filtered
from core.schemas import GenerationParams, Tool
from core.tool_calls import parse_tool_calls
from core.variants import Variant
from db.endings import JobEnd, end_jobs, ended_before, settle
from db.models import Job
from db.repo import files as files_repo
from db.repo import runs
from db.repo.runs import Claimed
from db.session import autocommit_engine, sync_sessionmaker
from workers.grouped import Grouped
from workers.shared.base import EngineFailure, Request, RequestError, Result, ShuttingDown
from workers.shell.adapters import adapter_ref
from workers.shell.media_decoding import decoded_bytes, file_ids, load_media, media_parts
from workers.shell.pool import VariantPool

log = structlog.get_logger(__name__)
# A job held back because its user's device loads for the hour are spent looks again this soon
# (another user's job may have made its variant warm meanwhile).
LOAD_RETRY_S = 10.0

_db_retry = retry(
    retry=retry_if_exception_type(OperationalError),
    wait=wait_exponential(multiplier=0.5, max=10),
    stop=stop_after_delay(120),
    reraise=True,
)


class WorkerContext:
    """What every job's task is handed (`run_job(ctx, job_id)`): the variant pool (engine, leases,
    Redis, broker, settings), and the claims and job ends that its task threads share.

    Messages arrive one by one, but while one claim runs the next ones queue up, and a batch's
    jobs end together: the threads that arrive while a claim (or an end) is being written wait,
    and the next of them writes all theirs in one statement (see workers/grouped.py)."""

    def __init__(self, pool: VariantPool) -> None:
        self.pool = pool
        self.claims: Grouped[str, Claimed | None] = Grouped(self._claim_all)
        self.ends: Grouped[JobEnd, bool] = Grouped(self._end_all)

    def _claim_all(self, job_ids: list[str]) -> list[Claimed | None]:
        return claim_all(self.pool, job_ids)

    def _end_all(self, ends: list[JobEnd]) -> list[bool]:
        return end_all(self.pool, ends)


def claim_all(pool: VariantPool, job_ids: list[str]) -> list[Claimed | None]:
    """Take these queued jobs for this worker in one statement; then clear the message markers of
    those taken and append their `running` events (one round trip)."""
    with autocommit_engine(pool.settings.db_url).connect() as connection:
        jobs = runs.claim_many(session=connection, job_ids=job_ids, worker=pool.worker)
    taken = [job for job in jobs if job is not None]
    if taken:
        with contextlib.suppress(redis.RedisError), pool.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*(message_key(pool.settings, job.id) for job in taken))  # as message_taken does
            for job in taken:
                add_status(pipe, pool.settings, job.id, "running", expire=False, attempt=job.attempts)
            pipe.execute()
    return jobs


def end_all(pool: VariantPool, ends: list[JobEnd]) -> list[bool]:
    """End these jobs (db/endings.py): for each, whether this call ended it."""
    ended = end_jobs(autocommit_engine(pool.settings.db_url), pool.redis, pool.settings, ends)
    return [e is not None for e in ended]


@_db_retry
def claim(ctx: WorkerContext, job_id: str) -> Claimed | None:
    """The job, taken for this worker (with the claims of other task threads under way); None
    when it is not queued. One past its deadline expires here; one that has ended is settled
    again (a no-op, unless the worker that ended it died before releasing its quota slot)."""
    job = ctx.claims(job_id)
    if job is not None:
        return job
    pool = ctx.pool
    engine = autocommit_engine(pool.settings.db_url)
    if end_jobs(engine, pool.redis, pool.settings, [JobEnd.expire(job_id)])[0] is None:
        with engine.connect() as connection:
            again = ended_before(connection, job_id)
        if again is not None:
            settle(pool.redis, pool.settings, [again])
    return None


@_db_retry
def finish(ctx: WorkerContext, job: Claimed, **outcome: Any) -> bool:
    """End the job this attempt ran (status, result, error, metrics), with the ends of other task
    threads under way; True when this call ended it (False: it had left this attempt)."""
    return ctx.ends(JobEnd(job_id=job.id, attempt=job.attempts, **outcome))


@_db_retry
def _put_back(
    pool: VariantPool, job: Claimed, reason: str = "the worker is shutting down", after_s: float | None = None
) -> None:
    """The claimed job back in the queue, its attempt given back (`after_s`: it runs no sooner)."""
    # Let go of the lease first, or the delivery of the message sent below would see it held.
    pool.release_lease(job.id)
    with sync_sessionmaker(pool.settings.db_url).begin() as session:
        back = runs.put_back(session=session, job_id=job.id, attempt=job.attempts)
    if back is not None:
        enqueue_again(pool.broker, back, countdown=after_s)
        log.info("job.returned", reason=reason, after_s=after_s)


@_db_retry
def _send_again(pool: VariantPool, job_id: str) -> None:
    with sync_sessionmaker(pool.settings.db_url)() as session:
        job = session.get(Job, job_id)
    if job is not None and job.status == "queued":
        enqueue_again(pool.broker, job)


def run_job(ctx: WorkerContext, job_id: str) -> None:
    """The one task: claim the job, hand it to its variant's engine, end it once."""
    pool = ctx.pool
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
            job = claim(ctx, job_id)
        except Exception:
            # The message is acked all the same: without its marker the reconciler sends it again.
            pool.message_taken(job_id)
            raise
        if job is None:
            log.info("job.skipped", reason="not queued: ended, expired or claimed by another delivery")
            return
        pool.note_claimed(job.id, job.attempts, moderation.policy_for(job.policy, pool.settings))
        _run(ctx, job)
    finally:
        pool.drop_lease(job_id, token)


def _run(ctx: WorkerContext, job: Claimed) -> None:
    structlog.contextvars.bind_contextvars(user_id=job.user_id, variant=job.variant, attempt=job.attempts)
    queue_ms = (job.started_at - job.created_at).total_seconds() * 1000
    try:
        _run_claimed(ctx, job, queue_ms)
    except OperationalError:
        # The database stayed away past the retries: the task ends, the lease is dropped, and the
        # reconciler requeues the job once the lease has stayed gone for lease_s.
        raise
    except Exception as exc:
        # Whatever went wrong, a claimed job must not stay running: it fails, the worker goes on.
        log.error("job.crashed", error=type(exc).__name__)
        _fail(
            ctx,
            job,
            errors.GENERATION_ERROR,
            f"the worker could not run it ({type(exc).__name__})",
            queue_ms,
        )


def _run_claimed(ctx: WorkerContext, job: Claimed, queue_ms: float) -> None:
    pool = ctx.pool
    started = time.monotonic()
    variant = pool.registry.get(job.variant)
    reason = pool.unavailable(job.variant) if variant is not None else "unknown variant"
    if variant is None or reason is not None:
        _fail(ctx, job, errors.GENERATION_ERROR, f"variant unavailable: {reason}", queue_ms)
        return
    if pool.would_load(job.variant):  # a device load: within the user's loads for the hour
        try:
            wait_s = pool.quotas.take_load(user_id=job.user_id, job_id=job.id)
        except redis.RedisError:  # a bound on loads, not a reason to fail or hold the job
            log.warning("job.load_uncounted", reason="redis unreachable")
            wait_s = 0.0
        if wait_s > 0:  # back in the queue, to look again (the variant may be warm by then)
            _put_back(pool, job, "the user's device loads for the hour are spent", min(wait_s, LOAD_RETRY_S))
            return
    contents = _contents(pool, job)
    # The job's decoded media, held from before it is decoded until its engine is done with it.
    with pool.media.hold(decoded_bytes(media_parts(job.input.get("messages") or [], contents),
                                       pool.settings.media_decode_max_side)):  # fmt: skip
        try:
            request = _request(pool, job, started, contents)
        except RequestError as exc:
            _fail(ctx, job, errors.GENERATION_ERROR, str(exc), queue_ms)
            return
        _engine_run(ctx, job, variant, request, queue_ms, started)


def _engine_run(
    ctx: WorkerContext, job: Claimed, variant: Variant, request: Request, queue_ms: float, started: float
) -> None:
    pool = ctx.pool
    future = pool.submit(job.variant, request)  # a cold variant loads first, within the limit
    limit = min(request.params.timeout_s or variant.timeout_s, variant.timeout_s)
    failure: Exception | None = None
    try:
        result = future.result(timeout=limit)
    except FutureTimeout as exc:
        # Stop it at the engine's next step (or its first, if it has not started), then let go.
        pool.request_cancel(job.id)
        failure = exc
        if not future.cancel():  # it ended just now: its outcome stands
            try:
                result, failure = future.result(timeout=0), None
            except Exception as late:
                failure = late
    except Exception as exc:
        failure = exc
    # Once the future is done: the work a job that ends without a result is charged for, as the
    # engine reported it at the end (a reply failed mid-way), else as it last reported progress.
    spent = pool.spent(job.id)
    if isinstance(failure, RequestError) and failure.spent is not None:
        spent = failure.spent
    if failure is None:
        _succeed(ctx, job, request, result, queue_ms, started)
    elif isinstance(failure, FutureTimeout) and future.cancelled():
        _fail(ctx, job, errors.TIMEOUT, f"no result within {limit:g} s", queue_ms, spent)
    elif isinstance(failure, ShuttingDown):
        _put_back(pool, job)  # run again elsewhere: this attempt is not charged
    elif isinstance(failure, RequestError):
        _fail(ctx, job, errors.GENERATION_ERROR, str(failure), queue_ms, spent)
    else:
        kind = failure.kind if isinstance(failure, EngineFailure) else type(failure).__name__
        log.error("job.generation_failed", error=kind)
        _fail(ctx, job, errors.GENERATION_ERROR, f"generation failed ({kind})", queue_ms, spent)


def _contents(pool: VariantPool, job: Claimed) -> dict[str, bytes]:
    """The bytes of the files the job's media parts name (its owner's, read from PostgreSQL)."""
    ids = file_ids(job.input.get("messages") or [])
    if not ids:
        return {}
    with sync_sessionmaker(pool.settings.db_url)() as session:
        return files_repo.read_contents(session=session, user_id=job.user_id, file_ids=ids)


def _request(pool: VariantPool, job: Claimed, started: float, contents: dict[str, bytes]) -> Request:
    """The job as the engine takes it: its media decoded on this thread, its adapter's weights on
    local disk."""
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
    if file_ids(messages or []):
        loaded = load_media(messages or [], contents, max_side=pool.settings.media_decode_max_side)
        request.messages = loaded.messages
        request.images, request.audio_clips = loaded.images, loaded.audio_clips
        request.audio_seconds, request.preprocess_ms = loaded.audio_seconds, loaded.ms
        request.media_bytes = loaded.bytes
    if request.params.adapter is not None:
        request.adapter = adapter_ref(
            db_url=pool.settings.db_url, cache_root=pool.settings.model_cache,
            adapter_id=request.params.adapter, user_id=job.user_id,
        )  # fmt: skip
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
        "media_bytes": request.media_bytes if request else None,
        "preprocess_ms": round((request.preprocess_ms if request else 0) + result.preprocess_ms, 3),
        "grammar_compile_ms": result.grammar_compile_ms,
        "grammar_mask_ms": result.grammar_mask_ms,
    }


def _succeed(
    ctx: WorkerContext, job: Claimed, request: Request, result: Result, queue_ms: float, started: float
) -> None:
    pool = ctx.pool
    category = moderation.policy_for(job.policy, pool.settings).check(result.text, "output")
    if category is not None:
        _withhold(ctx, job, request, result, queue_ms, started, category)
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
    written = finish(
        ctx, job, status="cancelled" if cancelled else "succeeded", result=body, error=error, metrics=metrics
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
    ctx: WorkerContext,
    job: Claimed,
    request: Request,
    result: Result,
    queue_ms: float,
    started: float,
    category: str,
) -> None:
    """The output fell in a moderation category: the job fails RESPONSE_FILTERED, its text is not
    stored (nor was any of it streamed past the filter), its usage is charged as it was spent."""
    pool = ctx.pool
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
    written = finish(ctx, job, status="failed", result=body, error=error, metrics=metrics)
    with contextlib.suppress(redis.RedisError), pool.redis.pipeline(transaction=False) as pipe:
        add_filtered(pipe, pool.settings, job.user_id, "output", category)
        pipe.execute()
    log.warning("job.filtered", stage="output", category=category, written=written)


def _fail(
    ctx: WorkerContext,
    job: Claimed,
    code: str,
    message: str,
    queue_ms: float,
    spent: tuple[int, int] | None = None,
) -> None:
    """End the job failed; `spent`: the (prompt, generated) tokens it had used, charged to its owner
    and recorded in its metrics as a result's usage would be."""
    pool = ctx.pool
    metrics = _metrics(pool, queue_ms, time.monotonic(), None)
    if spent is not None:
        metrics["input_tokens"], metrics["output_tokens"] = spent
    error = {"code": code, "message": message}
    written = finish(ctx, job, status="failed", result=None, error=error, metrics=metrics, spent=spent)
    log.warning("job.failed", code=code, written=written)

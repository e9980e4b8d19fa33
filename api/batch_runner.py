"""The batch runner: an asyncio task in each API process that moves batches along.

Each turn it locks one batch (the least recently worked on; another process's are skipped) and:
- `validating` → `in_progress`;
- `in_progress`: submits its next lines as ordinary jobs (the API's `Submitter`) at
  `BATCH_PRIORITY`, below interactive jobs, until a quota refuses one — the batch then waits
  for slots to free, so a 50,000-line file never floods the queue — or `LINES_PER_TURN` are in.
  Each line's job carries the idempotency key `<batch id>:<line>`, so a turn cut short by a crash
  and run again queues no line twice. A line that is not a request this API serves is recorded
  as a line error (the error file) and the batch goes on. Once every line is in and every job
  has ended: `finalizing`;
- past its `expires_at`, or cancelled: `cancelling` — queued jobs end `cancelled`, running ones
  are asked to stop; once none is left: `finalizing`;
- `finalizing`: writes the output file (succeeded lines, in line order) and the error file (the
  other jobs, then the lines that never became one), in parts, then `completed`, `cancelled` or
  `expired`.
A batch's file is read one part (about 1 MiB of whole lines) at a time.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError
from sqlalchemy import RowMapping
from sqlalchemy.exc import DataError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.background import Background
from api.cancels import Cancels
from api.schemas import job_out
from api.submission import Submitter
from core.errors import AppError, QuotaExceeded, RateLimited, Unavailable, ValidationFailed
from core.openai_batch import LINE_ENDPOINTS
from core.schemas import JobCreate
from core.settings import Settings
from core.text_checks import string_problem, text_problem
from db.models import Batch, BatchLineError, User
from db.repo import batches as batches_repo
from db.repo import files as files_repo
from db.repo import jobs as jobs_repo

log = structlog.get_logger(__name__)
T = TypeVar("T")

LINES_PER_TURN = 256
CANCELS_PER_TURN = 500
PAGE = 500  # jobs read at a time while the output files are written
PART_BYTES = 1024 * 1024
IDLE_S = 0.5  # between turns when no batch needs one
REFUSED_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # a quota refused a line: the batch's next turns wait
FAILED_BACKOFF_S = (1.0, 5.0, 30.0, 120.0)  # a turn failed (a bug, the database away)
PARTS_KEPT = 8  # batch file parts kept in memory between turns (about 1 MiB each)


class BatchRunner(Background):
    task_name = "batch-runner"

    def __init__(
        self,
        *,
        submitter: Submitter,
        cancels: Cancels,
        maker: async_sessionmaker[AsyncSession],
        settings: Settings,
    ) -> None:
        self.submitter = submitter
        self.cancels = cancels
        self.maker = maker
        self.settings = settings
        self._cached_parts: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
        self._held: dict[str, tuple[int, str, JobCreate]] = {}  # batch → a refused line's job
        self._refusals: dict[str, int] = {}  # batch → quota refusals in a row
        self._failures: dict[str, int] = {}  # batch → failed turns in a row

    async def _run(self) -> None:
        while True:
            try:
                worked = await self.turn()
            except Exception:
                log.exception("batch.turn_failed")
                worked = False
            await asyncio.sleep(0 if worked else IDLE_S)

    async def turn(self) -> bool:
        """Work on one batch; False when none needed it. Whatever goes wrong in a turn stays in
        that batch: the turn is rolled back, and the batch waits longer and longer before its
        next one while the others go on."""
        batch_id: str | None = None
        try:
            async with self.maker() as session, session.begin():
                batch = await batches_repo.lock_next(session=session)
                if batch is None:
                    return False
                batch_id = batch.id
                batch.worked_at, batch.next_turn_at = datetime.now(UTC), None
                user = await batches_repo.owner(session=session, user_id=batch.user_id)
                if user is None:
                    return True
                structlog.contextvars.bind_contextvars(batch_id=batch.id, user_id=user.id)
                wait = await self._advance(batch, user)
                if wait:
                    batch.next_turn_at = datetime.now(UTC) + timedelta(seconds=wait)
        except Exception:
            if batch_id is None:
                raise
            failures = self._failures[batch_id] = self._failures.get(batch_id, 0) + 1
            wait = _backoff(FAILED_BACKOFF_S, failures)
            log.exception("batch.turn_failed", batch_id=batch_id, failures=failures, retry_in_s=wait)
            async with self.maker() as session, session.begin():
                await batches_repo.put_off(session=session, batch_id=batch_id, seconds=wait)
            return True
        finally:
            structlog.contextvars.unbind_contextvars("batch_id", "user_id")
        self._failures.pop(batch_id, None)
        return True

    async def _advance(self, batch: Batch, user: User) -> float | None:
        """One step of the batch's life; the seconds to wait before its next turn, if any."""
        now = datetime.now(UTC)
        if batch.status == "validating":
            batch.status, batch.in_progress_at = "in_progress", now
            log.info("batch.in_progress", total=batch.total)
        if batch.status == "in_progress" and now >= batch.expires_at:
            batch.status, batch.ending, batch.cancelling_at = "cancelling", "expired", now
            log.info("batch.expiring")
        if batch.status == "in_progress":
            if batch.submitted < batch.total:
                return await self._submit_lines(batch, user)
            if not await self._pending(batch):
                batch.status, batch.finalizing_at = "finalizing", now
        elif batch.status == "cancelling":
            if not await self._stop_jobs(batch, user):
                batch.status, batch.finalizing_at = "finalizing", now
        elif batch.status == "finalizing":
            await self._finalize(batch)
        self._refusals.pop(batch.id, None)
        self._held.pop(batch.id, None)
        return None

    # ---- in progress ---------------------------------------------------------------------

    async def _submit_lines(self, batch: Batch, user: User) -> float | None:
        """Queue the batch's next lines; the seconds to wait when a quota refused one."""
        lines = await self._lines(batch.input_file_id, batch.next_part)
        if lines is None:  # every part read: the count at upload was the truth
            batch.total = batch.submitted
            return None
        submitted = 0
        while batch.next_line < len(lines) and submitted < LINES_PER_TURN:
            raw = lines[batch.next_line]
            if raw.strip():
                if not await self._submit_line(batch, user, raw, batch.submitted):
                    # A quota is full: this line again, later and later while it stays full.
                    refusals = self._refusals[batch.id] = self._refusals.get(batch.id, 0) + 1
                    return _backoff(REFUSED_BACKOFF_S, refusals)
                batch.submitted += 1
                submitted += 1
            batch.next_line += 1
        self._refusals.pop(batch.id, None)
        if batch.next_line >= len(lines):
            self._cached_parts.pop((batch.input_file_id, batch.next_part), None)
            batch.next_part, batch.next_line = batch.next_part + 1, 0
        return None

    async def _lines(self, file_id: str, seq: int) -> list[bytes] | None:
        """The lines of a batch file's part `seq` (None past the last), kept for the next turns."""
        key = (file_id, seq)
        if key in self._cached_parts:
            self._cached_parts.move_to_end(key)
            return self._cached_parts[key]
        async with self.maker() as session:
            part = await files_repo.read_part(session=session, file_id=file_id, seq=seq)
        if part is None:
            return None
        lines = bytes(part.data).split(b"\n")
        self._cached_parts[key] = lines
        while len(self._cached_parts) > PARTS_KEPT:
            self._cached_parts.popitem(last=False)
        return lines

    async def _submit_line(self, batch: Batch, user: User, raw: bytes, line: int) -> bool:
        """Queue one line's job, or record why it cannot be one; False: refused for now (quota).
        A refused line's job is kept, decoded, for the next turn."""
        custom_id: str | None = None
        try:
            held = self._held.pop(batch.id, None)
            if held is not None and held[0] == line:
                _, custom_id, spec = held
            else:
                custom_id, spec = _decode(batch, raw)
            try:
                await self.submitter.submit(
                    user, spec, idempotency_key=f"{batch.id}:{line}", batch=(batch.id, line)
                )
            except (RateLimited, QuotaExceeded, Unavailable):
                self._held[batch.id] = (line, custom_id, spec)
                return False
        except _LineError as exc:
            await self._line_error(batch.id, line, exc.custom_id, exc.code, exc.message)
        except AppError as exc:
            await self._line_error(batch.id, line, custom_id, exc.code, exc.message)
        except DataError:  # what validation missed and PostgreSQL refused: this line's, not the batch's
            log.warning("batch.line_unstorable", line=line)
            await self._line_error(
                batch.id, line, custom_id, "invalid_request", "the line holds a value that cannot be stored"
            )
        return True

    async def _line_error(
        self, batch_id: str, line: int, custom_id: str | None, code: str, message: str
    ) -> None:
        async with self.maker() as session, session.begin():
            await batches_repo.add_line_error(
                session=session, batch_id=batch_id, line=line, custom_id=custom_id, code=code, message=message
            )

    async def _pending(self, batch: Batch) -> int:
        async with self.maker() as session:
            counts = (await batches_repo.counts(session=session, batch_ids=[batch.id]))[batch.id]
        return sum(counts.get(s, 0) for s in batches_repo.PENDING)

    # ---- cancelling ----------------------------------------------------------------------

    async def _stop_jobs(self, batch: Batch, user: User) -> int:
        """Queued jobs cancelled, running ones asked to stop; how many have not ended yet."""
        async with self.maker() as session:
            queued = await batches_repo.job_ids(
                session=session, batch_id=batch.id, status="queued", limit=CANCELS_PER_TURN
            )
            running = await batches_repo.job_ids(
                session=session, batch_id=batch.id, status="running", limit=CANCELS_PER_TURN
            )
        for job_id in queued:
            await self.cancels.queued(user.id, job_id)
        for job_id in running:
            await self.cancels.running(job_id)
        return await self._pending(batch)

    # ---- finalizing ----------------------------------------------------------------------

    async def _finalize(self, batch: Batch) -> None:
        output = await self._write(batch, errors=False)
        error = await self._write(batch, errors=True)
        now = datetime.now(UTC)
        batch.output_file_id = output
        batch.error_file_id = error
        if batch.ending == "cancelled":
            batch.status, batch.cancelled_at = "cancelled", now
        elif batch.ending == "expired":
            batch.status, batch.expired_at = "expired", now
        else:
            batch.status, batch.completed_at = "completed", now
        log.info("batch.ended", status=batch.status, total=batch.total)

    async def _write(self, batch: Batch, *, errors: bool) -> str | None:
        """The output file (errors=False: the succeeded lines) or the error file; None if empty."""
        async with self.maker() as session, session.begin():
            file = await files_repo.create_parted_file(
                session=session, user_id=batch.user_id, purpose="batch_output",
                filename=f"{batch.id}_{'error' if errors else 'output'}.jsonl",
                parts=self._parts(batch, errors),
                expires_at=files_repo.expiry(self.settings.files_retention_s),
            )  # fmt: skip
            if not (file.media or {}).get("lines"):
                await files_repo.delete_file(session=session, user_id=batch.user_id, file_id=file.id)
                return None
            return file.id

    async def _parts(self, batch: Batch, errors: bool) -> AsyncIterator[tuple[bytes, int]]:
        buffer, count = bytearray(), 0
        async for record in self._records(batch, errors):
            buffer += json.dumps(record).encode() + b"\n"
            count += 1
            if len(buffer) >= PART_BYTES:
                yield bytes(buffer), count
                buffer, count = bytearray(), 0
        if buffer:
            yield bytes(buffer), count

    async def _records(self, batch: Batch, errors: bool) -> AsyncIterator[dict[str, Any]]:
        """The output file's lines (succeeded jobs), or the error file's: the other jobs, then the
        lines that never became a job — each in line order."""

        def jobs(session: AsyncSession, after: int) -> Awaitable[list[RowMapping]]:
            return jobs_repo.batch_jobs_page(session=session, batch_id=batch.id, after_line=after, limit=PAGE)

        async for row in self._paged(jobs, lambda row: int(row["batch_line"])):
            record = _record(batch, job_out(row))
            if (record["error"] is not None) == errors:
                yield record
        if not errors:
            return

        def failed(session: AsyncSession, after: int) -> Awaitable[list[BatchLineError]]:
            return batches_repo.line_errors(session=session, batch_id=batch.id, after_line=after, limit=PAGE)

        async for e in self._paged(failed, lambda e: e.line):
            yield {
                "id": f"batch_req_{batch.id}_{e.line}", "custom_id": e.custom_id, "response": None,
                "error": {"code": e.code, "message": e.message, "line": e.line},
            }  # fmt: skip

    async def _paged(
        self, fetch: Callable[[AsyncSession, int], Awaitable[list[T]]], line: Callable[[T], int]
    ) -> AsyncIterator[T]:
        """Every item `fetch` pages through, `PAGE` at a time after the last one's line."""
        after = -1
        while True:
            async with self.maker() as session:
                page = await fetch(session, after)
            for item in page:
                yield item
            if len(page) < PAGE:
                return
            after = line(page[-1])


class _LineError(Exception):
    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


def _decode(batch: Batch, raw: bytes) -> tuple[str, JobCreate]:
    """A line's custom_id and job, or a `_LineError` saying why it cannot be one."""
    try:
        request = json.loads(raw)
    except RecursionError:
        raise _LineError("invalid_json", "the line nests too deeply") from None
    except ValueError:
        raise _LineError("invalid_json", "the line is not a JSON object") from None
    if not isinstance(request, dict):
        raise _LineError("invalid_json", "the line is not a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= 200 or string_problem(custom_id):
        raise _LineError(
            "invalid_request",
            "custom_id: a string of 1 to 200 characters of text (no NUL, no lone surrogate)",
        )
    problem = text_problem(request, "line")
    if problem is not None:
        raise _LineError("invalid_request", problem, custom_id)
    if request.get("method", "POST") != "POST" or request.get("url") != batch.endpoint:
        raise _LineError("invalid_request", f"each line is a POST to {batch.endpoint}", custom_id)
    endpoint = LINE_ENDPOINTS[batch.endpoint]
    try:
        spec = endpoint.to_job(request.get("body"), {"batch_id": batch.id, "custom_id": custom_id})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise _LineError("invalid_request", f"body.{where}: {first['msg']}", custom_id) from None
    except ValidationFailed as exc:
        raise _LineError("invalid_request", f"body.{exc.message}", custom_id) from None
    except AppError as exc:
        raise _LineError(exc.code, exc.message, custom_id) from None
    return custom_id, spec


def _backoff(steps: tuple[float, ...], times: int) -> float:
    return steps[min(times, len(steps)) - 1]


def _record(batch: Batch, job: Any) -> dict[str, Any]:
    """One output or error line for a line's job, as OpenAI's batch files have them."""
    custom_id = job.metadata.get("custom_id")
    base = {"id": f"batch_req_{job.id}", "custom_id": custom_id}
    if job.status == "succeeded":
        body = LINE_ENDPOINTS[batch.endpoint].answer(job)
        return base | {"response": {"status_code": 200, "request_id": job.id, "body": body}, "error": None}
    code = job.error.code if job.error else job.status.upper()
    message = job.error.message if job.error else f"the job ended {job.status}"
    return base | {"response": None, "error": {"code": code, "message": message}}

"""One error envelope for every refusal: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import AppError
from core.schemas import JobOut

log = structlog.get_logger(__name__)

_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMIT_EXCEEDED",
    503: "UNAVAILABLE",
}


# What a 503 asks the caller to wait before trying again: a dependency that went away (a Redis or
# PostgreSQL failover, a restart) is usually back within a few seconds.
RETRY_AFTER_S = 2


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None
) -> JSONResponse:
    """The envelope; a 503 carries `Retry-After`."""
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for a route: every listed status documented with the envelope."""
    return {s: {"model": ErrorResponse, "description": _HTTP_CODES.get(s, "error")} for s in statuses}


async def _app_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    response = error_response(exc.status, exc.code, exc.message, exc.details)
    response.headers.update(exc.headers)
    return response


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request", "type": ""}
    if first["type"] == "json_invalid":
        message = "the request body is not valid JSON"
    else:
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "request"
        message = f"{where}: {first['msg']}"
    return error_response(422, "VALIDATION_ERROR", message, {"errors": errors})


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # a body FastAPI cannot parse (bytes that are not JSON, a broken form)
        return error_response(422, "VALIDATION_ERROR", f"the request body could not be parsed: {exc.detail}")
    code = _HTTP_CODES.get(exc.status_code, "ERROR")
    response = error_response(exc.status_code, code, str(exc.detail))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A value PostgreSQL refuses is the caller's (422); a database that does not answer is ours (503)."""
    if isinstance(exc, DataError):
        return error_response(422, "VALIDATION_ERROR", "a value in the request cannot be stored")
    log.warning("request.database_unavailable", path=request.url.path, error=type(exc).__name__)
    return error_response(503, "UNAVAILABLE", "the database is not answering; retry shortly")


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("request.redis_unavailable", path=request.url.path, error=type(exc).__name__)
    return error_response(503, "UNAVAILABLE", "Redis is not answering; retry shortly")


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex
    log.exception("request.unhandled", request_id=request_id, path=request.url.path)
    return error_response(500, "INTERNAL", "internal error", {"request_id": request_id})


async def response_for(request: Request, exc: Exception) -> JSONResponse:
    """The answer the handlers below give for `exc`, for code that runs outside the app's own
    exception handling (the ASGI layers of api/middleware.py)."""
    if isinstance(exc, AppError):
        return await _app_error(request, exc)
    if isinstance(exc, DBAPIError | PoolTimeout):
        return await _database_error(request, exc)
    if isinstance(exc, RedisError):
        return await _redis_error(request, exc)
    return await _unhandled(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(Exception, _unhandled)


# A failed job's error code, under these HTTP statuses (others: 502).
FAILED_STATUS = {"TIMEOUT": 504, "CONTENT_FILTERED": 400, "RESPONSE_FILTERED": 400}


def job_error_response(job: JobOut, headers: dict[str, str] | None = None) -> JSONResponse:
    """How the OpenAI-shaped routes answer a job that did not succeed: its error code, under the
    HTTP status the code has (a job still running past the wait: 504), with `headers`."""
    details = {"job_id": job.id, "status": job.status}
    if job.status == "failed" and job.error is not None:
        status = FAILED_STATUS.get(job.error.code, 502)
        response = error_response(status, job.error.code, job.error.message, details)
    elif job.status in ("cancelled", "expired"):
        code = job.error.code if job.error else job.status.upper()
        response = error_response(409, code, f"the job was {job.status} before it finished", details)
    else:
        message = f"the job is still {job.status}; follow it at /v1/jobs/{job.id}"
        response = error_response(504, "TIMEOUT", message, details)
    response.headers.update(headers or {})
    return response

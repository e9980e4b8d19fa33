"""The one error vocabulary: every refusal is an AppError with a status and a code."""

from __future__ import annotations

from typing import Any, ClassVar


class AppError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL"

    def __init__(
        self, message: str, details: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


class Unauthorized(AppError):
    status, code = 401, "UNAUTHORIZED"


class Forbidden(AppError):
    status, code = 403, "FORBIDDEN"


class NotFound(AppError):
    status, code = 404, "NOT_FOUND"


class Conflict(AppError):
    status, code = 409, "CONFLICT"


class PayloadTooLarge(AppError):
    status, code = 413, "PAYLOAD_TOO_LARGE"


class UnsupportedMedia(AppError):
    status, code = 415, "UNSUPPORTED_MEDIA"


class ValidationFailed(AppError):
    status, code = 422, "VALIDATION_ERROR"


class ContentFiltered(AppError):
    """The input falls in a category of the user's moderation policy (core/moderation.py)."""

    status, code = 400, "CONTENT_FILTERED"


class UnknownVariant(AppError):
    status, code = 422, "UNKNOWN_VARIANT"


class RateLimited(AppError):
    status, code = 429, "RATE_LIMIT_EXCEEDED"


class QuotaExceeded(AppError):
    status, code = 429, "QUOTA_EXCEEDED"


class Unavailable(AppError):
    status, code = 503, "UNAVAILABLE"


# Codes a failed or cancelled job carries in its `error.code`.
GENERATION_ERROR = "GENERATION_ERROR"
TIMEOUT = "TIMEOUT"
CANCELLED = "CANCELLED"
EXPIRED = "EXPIRED"
RESPONSE_FILTERED = "RESPONSE_FILTERED"  # its output fell in a moderation category: withheld

"""The one exception tree of hashmesh and its translation to gRPC status.

Domain code raises these; the gRPC edge (``hashmesh.core.rpc``) turns them into a status with
rich details (google.rpc.BadRequest, RetryInfo, ErrorInfo) in one table, so every service
answers bad input the same way."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "hashmesh.dev"
MAX_MESSAGE_CHARS = 1000
"""Longest status message or field description sent: a message that echoes a huge input (an
unknown 10 KB address) would overflow gRPC's 16 KiB trailer limit and reach the caller as an
unrelated RESOURCE_EXHAUSTED."""
MAX_RETRY_AFTER = 86_400.0
"""Longest retry delay announced (google.protobuf.Duration cannot hold an infinite one)."""


def _bounded(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 1] + "…"


def _bounded_delay(seconds: float) -> float:
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


class HashmeshError(Exception):
    """Base of every error that maps to a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = _bounded(message)
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        return []


class InvalidArgument(HashmeshError):
    """A request field is wrong; ``field`` names it (dotted path, e.g. ``argon2.time_cost``)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        field, description = _bounded(field), _bounded(description)
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=self.field, description=self.description
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [packed]


class NotFound(HashmeshError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(HashmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(HashmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(HashmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(HashmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(HashmeshError):
    """Refused for load; the caller may retry after ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float, reason: str = "OVERLOADED") -> None:
        super().__init__(message)
        self.retry_after = _bounded_delay(retry_after)
        self.reason = reason

    def details(self) -> list[any_pb2.Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after * 1e9))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN))
        return [retry, info]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", f"{self.retry_after:.3f}"),)


class Unavailable(HashmeshError):
    """A dependency (the database, every replica) cannot be reached; the message says which."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = None if retry_after is None else _bounded_delay(retry_after)

    def details(self) -> list[any_pb2.Any]:
        if self.retry_after is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after * 1e9))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return [retry]


def to_grpc_status(error: HashmeshError) -> grpc.Status:
    """The status (code, message and ``grpc-status-details-bin`` trailer) for ``error``."""
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=error.message,
        details=error.details(),
    )
    result = rpc_status.to_status(status)
    extra = getattr(error, "trailing_metadata", None)
    if extra is not None:
        return _WithMetadata(result.code, result.details, tuple(result.trailing_metadata) + extra())
    return result


class _WithMetadata(grpc.Status):  # type: ignore[misc]
    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata

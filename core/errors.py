"""The one exception tree of hashmesh and its translation to gRPC status.

Domain code raises these; the gRPC edge (``hashmesh.core.rpc``) turns them into a status with
rich details in one place, so every service answers the same way: each error carries a
``google.rpc.ErrorInfo`` (a reason from the catalogue, ``hashmesh.core.catalogue``, and the
domain ``hashmesh.dev``), plus what its kind calls for — BadRequest with every bad field,
ResourceInfo, PreconditionFailure, RetryInfo — and refusals that may be retried carry
``retry-after`` (whole seconds, rounded up) and gRFC A6's ``grpc-retry-pushback-ms``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "hashmesh.dev"
MAX_MESSAGE_CHARS = 1000
"""Longest status message or field description sent: a message that echoes a huge input (an
unknown 10 KB address) would overflow gRPC's 16 KiB trailer limit and reach the caller as an
unrelated RESOURCE_EXHAUSTED."""
MAX_VIOLATIONS = 20
"""Most field violations listed in one BadRequest (ErrorInfo.metadata["violations"] has the
total): a batch of 10,000 bad specs must still fit gRPC's 8 KiB metadata budget."""
MAX_LISTED_DESCRIPTION = 160
"""Longest description of each violation when a BadRequest lists several."""
MAX_RETRY_AFTER = 86_400.0
"""Longest retry delay announced (google.protobuf.Duration cannot hold an infinite one)."""
RETRY_AFTER = "retry-after"
RETRY_PUSHBACK = "grpc-retry-pushback-ms"


def _bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def _bounded_delay(seconds: float) -> float:
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return _pack(error_details_pb2.RetryInfo(retry_delay=delay))


def retry_trailers(seconds: float) -> tuple[tuple[str, str], ...]:
    """``retry-after`` in whole seconds, rounded up (RFC 9110 delay-seconds), and
    ``grpc-retry-pushback-ms`` (gRFC A6) in whole milliseconds, rounded up."""
    return (
        (RETRY_AFTER, str(max(1, math.ceil(seconds)))),
        (RETRY_PUSHBACK, str(max(1, math.ceil(seconds * 1000)))),
    )


class HashmeshError(Exception):
    """Base of every error that maps to a gRPC status. ``reason`` is its ErrorInfo reason, one
    of the catalogue's; ``info`` goes in ErrorInfo.metadata."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self, message: str, *, reason: str | None = None, info: Mapping[str, str] | None = None
    ) -> None:
        message = _bounded(message)
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.info = dict(info or {})

    def error_info(self) -> error_details_pb2.ErrorInfo:
        return error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.info
        )

    def extra_details(self) -> list[any_pb2.Any]:
        """What this kind adds after the ErrorInfo."""
        return []

    def details(self) -> list[any_pb2.Any]:
        return [_pack(self.error_info()), *self.extra_details()]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class InvalidArgument(HashmeshError):
    """Request fields are wrong; each violation names one (a dotted path such as
    ``specs[3].argon2.time_cost``). ``field`` and ``description`` are the first one's."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_FIELD"

    def __init__(
        self,
        field: str,
        description: str,
        *,
        reason: str | None = None,
        info: Mapping[str, str] | None = None,
        more: Sequence[tuple[str, str]] = (),
    ) -> None:
        violations = [(field, description), *more]
        listed = violations[:MAX_VIOLATIONS]
        limit = MAX_MESSAGE_CHARS if len(listed) == 1 else MAX_LISTED_DESCRIPTION
        self.violations = tuple((_bounded(f, 200), _bounded(d, limit)) for f, d in listed)
        self.field, self.description = self.violations[0]
        if len(violations) == 1:
            message = f"{self.field}: {self.description}"
        else:
            message = f"{len(violations)} invalid fields: " + "; ".join(
                f"{f}: {d}" for f, d in self.violations
            )
        super().__init__(message, reason=reason, info=info)
        if len(violations) > 1:
            self.info["violations"] = str(len(violations))

    @classmethod
    def of(
        cls,
        violations: Sequence[tuple[str, str]],
        *,
        reason: str | None = None,
        info: Mapping[str, str] | None = None,
    ) -> InvalidArgument:
        first, *rest = violations
        return cls(first[0], first[1], reason=reason, info=info, more=rest)

    def extra_details(self) -> list[any_pb2.Any]:
        return [
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=field, description=description
                        )
                        for field, description in self.violations
                    ]
                )
            )
        ]


class Violations:
    """Collects every bad field of a request, so the answer lists them all, not the first."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.reason: str | None = None
        self.info: dict[str, str] = {}

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def check(self) -> Violations:
        """``with violations.check():`` records an ``InvalidArgument`` raised inside instead of
        letting it through. (A plain context manager: contextlib's costs microseconds a use,
        and ComputeHash, the hottest method, uses it on every call.)"""
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> bool:
        if not isinstance(error, InvalidArgument):
            return False
        self.include(error)
        return True

    def include(self, error: InvalidArgument) -> None:
        self.items.extend(error.violations)
        if error.reason != InvalidArgument.default_reason:
            # A more specific reason (INPUT_TOO_LARGE) wins over INVALID_FIELD.
            self.reason = error.reason
            self.info.update(error.info)

    def raise_if_any(self) -> None:
        if self.items:
            self.info.pop("violations", None)
            raise InvalidArgument.of(self.items, reason=self.reason, info=self.info)


class NotFound(HashmeshError):
    """A named resource does not exist; google.rpc.ResourceInfo names it."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"

    def __init__(
        self, message: str, *, reason: str, resource_type: str, resource_name: str
    ) -> None:
        super().__init__(message, reason=reason)
        self.resource_type = resource_type
        self.resource_name = _bounded(resource_name, 200)

    def extra_details(self) -> list[any_pb2.Any]:
        return [
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=self.resource_type,
                    resource_name=self.resource_name,
                    description=self.message,
                )
            )
        ]


def task_not_found(task_id: str) -> NotFound:
    return NotFound(
        f"task {task_id} not found",
        reason="TASK_NOT_FOUND",
        resource_type="hashmesh.v1.Task",
        resource_name=task_id,
    )


class FailedPrecondition(HashmeshError):
    """The resource's state does not allow the call; google.rpc.PreconditionFailure says
    which condition (``violation_type``) on which resource (``subject``)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(
        self, message: str, *, reason: str, subject: str, violation_type: str = "TASK_STATUS"
    ) -> None:
        super().__init__(message, reason=reason)
        self.subject = _bounded(subject, 200)
        self.violation_type = violation_type

    def extra_details(self) -> list[any_pb2.Any]:
        return [
            _pack(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=self.violation_type,
                            subject=self.subject,
                            description=self.message,
                        )
                    ]
                )
            )
        ]


class Unauthenticated(HashmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(HashmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class DeadlineExceeded(HashmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_PASSED"


class ResourceExhausted(HashmeshError):
    """Refused for load; the caller may retry after ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "OVERLOADED"

    def __init__(self, message: str, *, retry_after: float, reason: str = "OVERLOADED") -> None:
        super().__init__(message, reason=reason)
        self.retry_after = _bounded_delay(retry_after)

    def extra_details(self) -> list[any_pb2.Any]:
        return [_retry_info(self.retry_after)]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return retry_trailers(self.retry_after)


class Unavailable(HashmeshError):
    """A dependency (the database, every replica) cannot be reached; the message says which."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(
        self, message: str, *, reason: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = None if retry_after is None else _bounded_delay(retry_after)

    def extra_details(self) -> list[any_pb2.Any]:
        return [] if self.retry_after is None else [_retry_info(self.retry_after)]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.retry_after is None else retry_trailers(self.retry_after)


def to_grpc_status(error: HashmeshError) -> grpc.Status:
    """The status (code, message and ``grpc-status-details-bin`` trailer) for ``error``."""
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=error.message,
        details=error.details(),
    )
    result = rpc_status.to_status(status)
    extra = error.trailing_metadata()
    if extra:
        return _WithMetadata(result.code, result.details, tuple(result.trailing_metadata) + extra)
    return result


class _WithMetadata(grpc.Status):
    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class InputTooLarge(InvalidArgument):
    """An input over the unary limit, wherever it is sent (Hash, Verify, a HashStream chunk, a
    task's spec): the same answer everywhere, and retrying will not help."""

    def __init__(self, field: str, size: int, limit: int, *, advice: str) -> None:
        super().__init__(
            field,
            f"is {size} bytes, over the {limit}-byte limit; {advice}",
            reason="INPUT_TOO_LARGE",
            info={"limit_bytes": str(limit), "size_bytes": str(size)},
        )
        self.size = size
        self.limit = limit

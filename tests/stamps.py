"""Identity stamps for tests that call a replica directly as the balancer would."""

from __future__ import annotations

from typing import Any

import grpc

from hashmesh.core.identity import Stamper
from tests.procs import IDENTITY_SECRET

_stamper = Stamper(IDENTITY_SECRET)


def stamp(identity: str, method: str, *, operator: bool = False) -> tuple[tuple[str, str], ...]:
    """Metadata saying, as the balancer, that ``identity`` calls ``method`` (``GetTask`` for
    TaskService, or a full ``/pkg.Service/Method`` name)."""
    full = method if method.startswith("/") else f"/hashmesh.v1.TaskService/{method}"
    return _stamper.stamp(identity, full, operator=operator)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


class ActingAs(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Stamps every call on a channel as ``identity`` (``grpc.intercept_channel``)."""

    def __init__(self, identity: str, *, operator: bool = False) -> None:
        self._identity = identity
        self._operator = operator

    def _details(self, details: Any) -> _Details:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        extra = list(_stamper.stamp(self._identity, method, operator=self._operator))
        return _Details(details, [*(details.metadata or ()), *extra])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def channel_as(address: str, identity: str, *, operator: bool = False) -> grpc.Channel:
    """A channel to a replica whose calls are stamped as ``identity``."""
    return grpc.intercept_channel(
        grpc.insecure_channel(address), ActingAs(identity, operator=operator)
    )

"""gRPC users for locust (locust-plugins 5.x ships none): a client interceptor that fires a
locust ``request`` event per call — method, response time, response size, exception and
gRPC status — for unary, server-streaming and client-streaming calls, and ``GrpcUser``, a
locust ``User`` holding an intercepted channel and a stub.

Import this module only inside a locust run: it switches grpc to gevent-compatible I/O.

    class MyUser(GrpcUser):
        stub_class = hash_pb2_grpc.HashServiceStub

        @task
        def hash(self) -> None:
            self.stub.ComputeHash(hash_pb2.HashRequest(...))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.env import Environment
from locust.exception import LocustError

from hashmesh.cli.client import sync_channel
from hashmesh.core.tls import ClientTls

grpc_gevent.init_gevent()

REQUEST_TYPE = "grpc"


class GrpcStatusError(Exception):
    """What locust records as the failure: the status name first, so its failure table groups
    by status (``RESOURCE_EXHAUSTED: ...``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def _size(message: Any) -> int:
    return int(message.ByteSize()) if hasattr(message, "ByteSize") else 0


class LocustInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Fires one locust request event per call on ``environment``."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def _fire(self, method: str, started: float, length: int, error: grpc.RpcError | None) -> None:
        exception = None
        status = grpc.StatusCode.OK
        if error is not None:
            status = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
            details = error.details() if hasattr(error, "details") else str(error)
            exception = GrpcStatusError(status, details or "")
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]
            request_type=REQUEST_TYPE,
            name=method,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            response=None,
            context={"grpc_status": status.name},
            exception=exception,
        )

    def _unary_response(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        started = time.perf_counter()
        call = continuation(details, request)
        try:
            self._fire(details.method, started, _size(call.result()), None)
        except grpc.RpcError as err:
            self._fire(details.method, started, 0, err)
        return call

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return self._unary_response(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._unary_response(continuation, client_call_details, request_iterator)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        started = time.perf_counter()
        responses = continuation(client_call_details, request)
        return _TimedStream(
            responses,
            lambda length, err: self._fire(client_call_details.method, started, length, err),
        )


class _TimedStream:
    """Passes a response stream through and reports once, when it ends or fails."""

    def __init__(self, inner: Any, report: Callable[[int, grpc.RpcError | None], None]) -> None:
        self._inner = inner
        self._report = report
        self._length = 0
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._inner)
        except StopIteration:
            self._finish(None)
            raise
        except grpc.RpcError as err:
            self._finish(err)
            raise
        self._length += _size(message)
        return message

    def _finish(self, error: grpc.RpcError | None) -> None:
        if not self._done:
            self._done = True
            self._report(self._length, error)

    def __getattr__(self, name: str) -> Any:  # code(), details(), cancel() of the call
        return getattr(self._inner, name)


def target_of(host: str | None) -> str:
    """``--host`` as a gRPC target: ``grpc://h:p``, ``http://h:p`` and ``h:p`` all work."""
    value = host or os.environ.get("HASHMESH_TARGET", "127.0.0.1:50050")
    for scheme in ("grpc://", "http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
    return value.rstrip("/")


class GrpcUser(User):
    """A locust user with ``self.stub`` (an instance of ``stub_class``) on an intercepted
    channel to ``--host``; ``self.metadata`` carries an ``x-client-id`` per user."""

    abstract = True
    stub_class: Any = None

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if self.stub_class is None:
            raise LocustError("set stub_class on your GrpcUser")
        # TLS from HASHMESH_TLS_* (locust has its own flags), as every hashctl channel.
        self._raw_channel = sync_channel(target_of(self.host), ClientTls.from_env())
        self.channel = grpc.intercept_channel(self._raw_channel, LocustInterceptor(environment))
        self.stub = self.stub_class(self.channel)
        self.metadata = (("x-client-id", f"locust-{id(self):x}"),)

    def on_stop(self) -> None:
        self._raw_channel.close()

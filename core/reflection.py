"""gRPC server reflection, v1 and v1alpha, answered from the contract's descriptor set.

grpcio-reflection serves v1alpha only, looks symbols up in a ``DescriptorPool`` (which cannot
find a method by its full name, so ``grpcurl describe pkg.Service.Method`` failed) and
re-serializes descriptors without their source info. This servicer answers from the
``FileDescriptorProto`` bytes as protoc wrote them (``descriptors.binpb``, built with
``--include_source_info`` by ``protos/generate.py``), so every comment of the contract reaches
a reflecting client. The two protocol versions have identical messages (v1 is v1alpha
renamed), so one handler, speaking the v1alpha messages of grpcio-reflection, serves both."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)
HEALTH = "grpc.health.v1.Health"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, made from v1alpha's (the messages are the same)."""
    v1 = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in v1.message_type:
        for field in message.field:
            field.type_name = field.type_name.replace(old, new)
    for method in v1.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    v1.options.Clear()
    return v1


@functools.cache
def contract_files() -> tuple[descriptor_pb2.FileDescriptorProto, ...]:
    """The hashmesh.v1 files and their imports, with comments, as committed."""
    raw = resources.files("hashmesh.v1").joinpath("descriptors.binpb").read_bytes()
    return tuple(descriptor_pb2.FileDescriptorSet.FromString(raw).file)


def _message_symbols(prefix: str, message: descriptor_pb2.DescriptorProto) -> Iterator[str]:
    name = f"{prefix}{message.name}"
    yield name
    for field in (*message.field, *message.extension):
        yield f"{name}.{field.name}"
    for oneof in message.oneof_decl:
        yield f"{name}.{oneof.name}"
    for enum in message.enum_type:
        yield f"{name}.{enum.name}"
        yield from (f"{name}.{value.name}" for value in enum.value)
    for nested in message.nested_type:
        yield from _message_symbols(f"{name}.", nested)


def symbols_of(file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    """Every fully qualified name ``file`` defines (messages, fields, enums and their values,
    services, methods, extensions), as reflection's ``file_containing_symbol`` looks them up."""
    prefix = f"{file.package}." if file.package else ""
    if file.package:
        yield file.package
    for message in file.message_type:
        yield from _message_symbols(prefix, message)
    for enum in file.enum_type:
        yield f"{prefix}{enum.name}"
        yield from (f"{prefix}{value.name}" for value in enum.value)
    for service in file.service:
        yield f"{prefix}{service.name}"
        yield from (f"{prefix}{service.name}.{method.name}" for method in service.method)
    for extension in file.extension:
        yield f"{prefix}{extension.name}"


class DescriptorIndex:
    """Files by name (serialized once), the file defining each symbol, and dependencies."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self._bytes: dict[str, bytes] = {}
        self._deps: dict[str, tuple[str, ...]] = {}
        self._symbols: dict[str, str] = {}
        self.messages: set[str] = set()
        for file in files:
            if file.name in self._bytes:
                continue
            self._bytes[file.name] = file.SerializeToString()
            self._deps[file.name] = tuple(file.dependency)
            prefix = f"{file.package}." if file.package else ""
            self.messages.update(f"{prefix}{m.name}" for m in file.message_type)
            for symbol in symbols_of(file):
                # A package name is shared by several files: the first one answers for it.
                self._symbols.setdefault(symbol, file.name)

    def file_of(self, symbol: str) -> str | None:
        return self._symbols.get(symbol)

    def with_dependencies(self, name: str) -> list[bytes] | None:
        """``name`` first, then every file it imports, transitively, each once."""
        if name not in self._bytes:
            return None
        order: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop()
            if current in order or current not in self._bytes:
                continue
            order.append(current)
            pending.extend(reversed(self._deps[current]))
        return [self._bytes[n] for n in order]


def default_index() -> DescriptorIndex:
    health = descriptor_pb2.FileDescriptorProto.FromString(health_pb2.DESCRIPTOR.serialized_pb)
    alpha = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    return DescriptorIndex([*contract_files(), health, alpha, _v1_file()])


Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


class Reflection:
    """Answers ServerReflectionInfo for ``service_names`` from ``index``."""

    def __init__(self, service_names: Sequence[str], index: DescriptorIndex) -> None:
        self._services = tuple(sorted({*service_names, *SERVICE_NAMES}))
        self._index = index

    def answer(self, request: Any) -> Any:
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            return Response(
                original_request=request,
                list_services_response=reflection_pb2.ListServiceResponse(
                    service=[reflection_pb2.ServiceResponse(name=n) for n in self._services]
                ),
            )
        if kind == "file_by_filename":
            return self._files(request, request.file_by_filename)
        if kind == "file_containing_symbol":
            return self._files(request, self._index.file_of(request.file_containing_symbol))
        if kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            if name in self._index.messages:
                return Response(
                    original_request=request,
                    all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                        base_type_name=name
                    ),
                )
            return _error(request, grpc.StatusCode.NOT_FOUND, f"no message type {name}")
        if kind == "file_containing_extension":  # the contract defines no extensions
            return _error(request, grpc.StatusCode.NOT_FOUND, "no such extension")
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "empty reflection request")

    def _files(self, request: Any, name: str | None) -> Any:
        files = self._index.with_dependencies(name) if name else None
        if files is None:
            return _error(request, grpc.StatusCode.NOT_FOUND, "not found")
        return Response(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=files
            ),
        )

    async def info(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.answer(request)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """One generic handler per protocol version (v1 and v1alpha)."""
        method = grpc.stream_stream_rpc_method_handler(
            self.info,
            request_deserializer=Request.FromString,
            response_serializer=Response.SerializeToString,
        )
        return [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
            for name in SERVICE_NAMES
        ]


def _error(request: Any, code: grpc.StatusCode, message: str) -> Any:
    return Response(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(
            error_code=code.value[0], error_message=message
        ),
    )


def add_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve reflection v1 and v1alpha on ``server``, listing ``service_names`` (plus
    reflection itself); call before the server starts."""
    server.add_generic_rpc_handlers(Reflection(service_names, default_index()).handlers())

"""HashService: hash now, on this replica.

Digests run on the event loop (hashlib is fast and releases the GIL for large inputs);
argon2id runs in the ``BoundedExecutor`` and is refused with RESOURCE_EXHAUSTED when that is
full. Deterministic results of the algorithms the cache settings name are looked up in and
stored to the ``ResultCache``. No request data is ever logged."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import AsyncIterator

import grpc

from hashmesh.core.errors import InputTooLarge, InvalidArgument, Violations
from hashmesh.core.handlers import Context, Handler
from hashmesh.core.hashing import algorithms
from hashmesh.core.hashing.algorithms import Algorithm
from hashmesh.core.hashing.cache import ResultCache
from hashmesh.core.hashing.wire import algorithm_from_wire, algorithm_to_wire, argon2_params
from hashmesh.hashd.executor import BoundedExecutor
from hashmesh.hashd.identity import CallerResolver
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc

STREAM_METHOD = "/hashmesh.v1.HashService/HashStream"
HASH_METHOD = "/hashmesh.v1.HashService/Hash"
# After a stream this long, hand freed heap pages back to the OS: glibc keeps them otherwise,
# and RSS would drift up with the chunk buffers of large streams (peak stays bounded anyway).
TRIM_AFTER_BYTES = 32 * 1024 * 1024


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def release_free_memory() -> None:
    """``malloc_trim(0)`` where glibc provides it; a no-op elsewhere."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def input_too_large(field: str, size: int, limit: int) -> InputTooLarge:
    """The answer for a unary input or a chunk over the limit (the same as SubmitTask's)."""
    if field == "chunk":
        advice = f"split the input into chunks of at most {limit} bytes"
    else:
        advice = f"send it with HashStream ({STREAM_METHOD}) instead"
    error = InputTooLarge(field, size, limit, advice=advice)
    error.info["use"] = STREAM_METHOD
    return error


_CHUNK_TAG = b"\x12"  # field 2 (chunk), wire type 2 (length-delimited)


def parse_stream_message(raw: bytes) -> hash_pb2.HashStreamRequest | memoryview:
    """HashStream's request deserializer. A message holding only a chunk (all but the first)
    becomes a zero-copy view of the chunk bytes: a 1 MiB chunk is then not copied twice more
    by protobuf on its way into the hash. Anything else goes through protobuf."""
    if raw[:1] == _CHUNK_TAG:
        length, shift, offset = 0, 0, 1
        while offset < len(raw) and offset <= 10:
            byte = raw[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if offset + length == len(raw):
                    return memoryview(raw)[offset:]
                break
    return hash_pb2.HashStreamRequest.FromString(raw)


def add_hash_service(servicer: HashService, server: grpc.aio.Server) -> None:
    """``add_HashServiceServicer_to_server`` with the fast HashStream deserializer."""
    compute = grpc.unary_unary_rpc_method_handler(
        servicer.ComputeHash,
        request_deserializer=hash_pb2.HashRequest.FromString,
        response_serializer=hash_pb2.HashResponse.SerializeToString,
    )
    handlers: dict[str, Handler] = {
        "ComputeHash": compute,
        "Hash": compute,  # the deprecated name of ComputeHash
        "HashStream": grpc.stream_unary_rpc_method_handler(
            servicer.HashStream,
            request_deserializer=parse_stream_message,
            response_serializer=hash_pb2.HashStreamResponse.SerializeToString,
        ),
        "Verify": grpc.unary_unary_rpc_method_handler(
            servicer.Verify,
            request_deserializer=hash_pb2.VerifyRequest.FromString,
            response_serializer=hash_pb2.VerifyResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("hashmesh.v1.HashService", handlers),)
    )
    server.add_registered_method_handlers("hashmesh.v1.HashService", handlers)


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class HashService(hash_pb2_grpc.HashServiceServicer):
    def __init__(
        self,
        executor: BoundedExecutor,
        cache: ResultCache | None,
        *,
        max_input_bytes: int,
        callers: CallerResolver,
        argon2_memory_kib: int | None = None,
    ) -> None:
        self._executor = executor
        self._cache = cache
        self._max_input = max_input_bytes
        self._callers = callers
        self._argon2_memory_kib = argon2_memory_kib

    def _tenant(self, context: Context) -> str:
        """Whose cache entries a call may read: resolved here, and only for a cacheable
        request, so that uncached digests (the hot path) skip the stamp check."""
        return self._callers.resolve(
            HASH_METHOD, context.peer(), context.invocation_metadata()
        ).identity

    async def ComputeHash(
        self,
        request: hash_pb2.HashRequest,
        context: grpc.aio.ServicerContext[hash_pb2.HashRequest, hash_pb2.HashResponse],
    ) -> hash_pb2.HashResponse:
        data = request.data
        try:
            algorithm: Algorithm | None = algorithm_from_wire(request.algorithm)
        except InvalidArgument:
            algorithm = None
        params: algorithms.Argon2Params | None = None
        if (
            algorithm is None
            or algorithm is Algorithm.ARGON2ID
            or len(data) > self._max_input
            or request.HasField("argon2")
        ):
            algorithm, params = self._checked(request)
        cache = self._cache
        cacheable = cache is not None and cache.is_cacheable(algorithm, params)
        if cacheable:
            assert cache is not None
            tenant = self._tenant(context)
            hit = await cache.lookup(algorithm, params, data, tenant=tenant)
            if hit is not None:
                return hash_pb2.HashResponse(
                    result=common_pb2.HashResult(
                        algorithm=request.algorithm,
                        digest=hit.digest,
                        encoded=hit.encoded,
                        cached=True,
                    )
                )
        if params is not None:
            raw, encoded = await self._executor.run(
                algorithms.argon2id, data, params, deadline=_deadline(context)
            )
        else:
            raw = algorithms.digest(algorithm, data)
            encoded = raw.hex()
        if cacheable:
            assert cache is not None
            await cache.store(algorithm, params, data, raw, encoded, tenant=tenant)
        return hash_pb2.HashResponse(
            result=common_pb2.HashResult(algorithm=request.algorithm, digest=raw, encoded=encoded)
        )

    Hash = ComputeHash  # the deprecated name

    def _checked(
        self, request: hash_pb2.HashRequest
    ) -> tuple[Algorithm, algorithms.Argon2Params | None]:
        """The algorithm and argon2 parameters of ``request``, or every bad field at once.
        (Off the fast path: a valid digest request never comes here.)"""
        violations = Violations()
        algorithm: Algorithm | None = None
        params: algorithms.Argon2Params | None = None
        with violations.check():
            algorithm = algorithm_from_wire(request.algorithm)
        if algorithm is Algorithm.ARGON2ID:
            with violations.check():
                params = argon2_params(request.argon2, memory_limit_kib=self._argon2_memory_kib)
        elif algorithm is not None and request.HasField("argon2"):
            violations.add("argon2", f"applies only to ALGORITHM_ARGON2ID, not {algorithm.name}")
        if len(request.data) > self._max_input:
            violations.include(input_too_large("data", len(request.data), self._max_input))
        violations.raise_if_any()
        assert algorithm is not None
        return algorithm, params

    async def HashStream(
        self,
        request_iterator: AsyncIterator[hash_pb2.HashStreamRequest | memoryview],
        context: grpc.aio.ServicerContext[hash_pb2.HashStreamRequest, hash_pb2.HashStreamResponse],
    ) -> hash_pb2.HashStreamResponse:
        # Each chunk is folded in and dropped: memory stays one chunk whatever the total size.
        hasher = None
        algorithm: Algorithm | None = None
        total = 0
        count = 1  # messages read, the header included
        async for message in request_iterator:
            if hasher is None:
                if isinstance(message, memoryview) or message.WhichOneof("kind") != "header":
                    raise InvalidArgument("header", "the first message must carry the header")
                algorithm = algorithm_from_wire(message.header.algorithm, field="header.algorithm")
                hasher = algorithms.new_digest(algorithm)
                continue
            count += 1
            if isinstance(message, memoryview):
                chunk: bytes | memoryview = message
            else:
                kind = message.WhichOneof("kind")
                if kind == "header":
                    raise InvalidArgument("header", "only the first message may carry the header")
                if kind is None:
                    raise InvalidArgument(
                        "chunk", f"message {count} of the stream carries neither header nor chunk"
                    )
                chunk = message.chunk
            if len(chunk) > self._max_input:
                raise input_too_large("chunk", len(chunk), self._max_input)
            hasher.update(chunk)
            total += len(chunk)
        if hasher is None or algorithm is None:
            raise InvalidArgument("header", "the stream was empty; send a header first")
        raw = hasher.digest()
        if total >= TRIM_AFTER_BYTES:
            release_free_memory()
        result = common_pb2.HashResult(
            algorithm=algorithm_to_wire(algorithm), digest=raw, encoded=raw.hex()
        )
        return hash_pb2.HashStreamResponse(result=result, total_bytes=total)

    async def Verify(
        self,
        request: hash_pb2.VerifyRequest,
        context: grpc.aio.ServicerContext[hash_pb2.VerifyRequest, hash_pb2.VerifyResponse],
    ) -> hash_pb2.VerifyResponse:
        if not request.encoded:
            raise InvalidArgument("encoded", "is required")
        if len(request.encoded) > algorithms.MAX_PHC_LENGTH:  # a PHC string or a hex digest
            raise InvalidArgument(
                "encoded", f"must be at most {algorithms.MAX_PHC_LENGTH} characters"
            )
        if len(request.data) > self._max_input:
            raise input_too_large("data", len(request.data), self._max_input)
        if request.algorithm == common_pb2.ALGORITHM_UNSPECIFIED and request.encoded.startswith(
            "$argon2"
        ):
            algorithm = Algorithm.ARGON2ID
        else:
            algorithm = algorithm_from_wire(request.algorithm)
        if algorithm is Algorithm.ARGON2ID:
            algorithms.validate_phc(request.encoded, memory_limit_kib=self._argon2_memory_kib)
            match, rehash = await self._executor.run(
                algorithms.argon2id_verify,
                request.encoded,
                request.data,
                deadline=_deadline(context),
            )
            return hash_pb2.VerifyResponse(match=match, needs_rehash=rehash)
        return hash_pb2.VerifyResponse(
            match=algorithms.digest_matches(algorithm, request.data, request.encoded)
        )

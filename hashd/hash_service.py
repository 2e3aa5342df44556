"""HashService: hash now, on this replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from hashmesh.core import hashing
from hashmesh.core.errors import InvalidArgument
from hashmesh.core.hashing import Algorithm
from hashmesh.core.wire import algorithm_from_wire, algorithm_to_wire
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc


def argon2_params(message: common_pb2.Argon2Params, *, field_prefix: str = "argon2") -> hashing.Argon2Params:
    return hashing.Argon2Params.build(
        time_cost=message.time_cost,
        memory_cost_kib=message.memory_cost_kib,
        parallelism=message.parallelism,
        hash_len=message.hash_len,
        salt=message.salt,
        field_prefix=field_prefix,
    )


class HashService(hash_pb2_grpc.HashServiceServicer):
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    async def Hash(self, request: hash_pb2.HashRequest, context: grpc.aio.ServicerContext) -> hash_pb2.HashResponse:
        algorithm = algorithm_from_wire(request.algorithm)
        if algorithm is Algorithm.ARGON2ID:
            params = argon2_params(request.argon2)
            raw, encoded = await asyncio.get_running_loop().run_in_executor(
                None, hashing.argon2id, request.data, params
            )
            result = common_pb2.HashResult(algorithm=request.algorithm, digest=raw, encoded=encoded)
        else:
            raw = hashing.digest(algorithm, request.data)
            result = common_pb2.HashResult(algorithm=request.algorithm, digest=raw, encoded=raw.hex())
        return hash_pb2.HashResponse(result=result)

    async def HashStream(
        self, request_iterator: AsyncIterator[hash_pb2.HashStreamRequest], context: grpc.aio.ServicerContext
    ) -> hash_pb2.HashStreamResponse:
        hasher = None
        algorithm: Algorithm | None = None
        total = 0
        async for message in request_iterator:
            kind = message.WhichOneof("kind")
            if hasher is None:
                if kind != "header":
                    raise InvalidArgument("header", "the first message must carry the header")
                algorithm = algorithm_from_wire(message.header.algorithm, field="header.algorithm")
                hasher = hashing.new_digest(algorithm)
            elif kind == "chunk":
                hasher.update(message.chunk)
                total += len(message.chunk)
            else:
                raise InvalidArgument("header", "only the first message may carry the header")
        if hasher is None or algorithm is None:
            raise InvalidArgument("header", "the stream was empty; send a header first")
        raw = hasher.digest()
        result = common_pb2.HashResult(algorithm=algorithm_to_wire(algorithm), digest=raw, encoded=raw.hex())
        return hash_pb2.HashStreamResponse(result=result, total_bytes=total)

    async def Verify(self, request: hash_pb2.VerifyRequest, context: grpc.aio.ServicerContext) -> hash_pb2.VerifyResponse:
        if not request.encoded:
            raise InvalidArgument("encoded", "is required")
        if request.algorithm == common_pb2.ALGORITHM_UNSPECIFIED and request.encoded.startswith("$argon2"):
            algorithm = Algorithm.ARGON2ID
        else:
            algorithm = algorithm_from_wire(request.algorithm)
        if algorithm is Algorithm.ARGON2ID:
            hashing.validate_phc(request.encoded)
            match, rehash = await asyncio.get_running_loop().run_in_executor(
                None, hashing.argon2id_verify, request.encoded, request.data
            )
            return hash_pb2.VerifyResponse(match=match, needs_rehash=rehash)
        return hash_pb2.VerifyResponse(match=hashing.digest_matches(algorithm, request.data, request.encoded))

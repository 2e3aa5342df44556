"""Conversions between the wire types (``hashmesh.v1``) and the core types."""

from __future__ import annotations

from hashmesh.core.errors import InvalidArgument
from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params
from hashmesh.v1 import common_pb2

_TO_CORE: dict[int, Algorithm] = {
    common_pb2.ALGORITHM_MD5: Algorithm.MD5,
    common_pb2.ALGORITHM_SHA1: Algorithm.SHA1,
    common_pb2.ALGORITHM_SHA256: Algorithm.SHA256,
    common_pb2.ALGORITHM_SHA512: Algorithm.SHA512,
    common_pb2.ALGORITHM_SHA3_256: Algorithm.SHA3_256,
    common_pb2.ALGORITHM_BLAKE2B: Algorithm.BLAKE2B,
    common_pb2.ALGORITHM_ARGON2ID: Algorithm.ARGON2ID,
}
_TO_WIRE: dict[Algorithm, int] = {v: k for k, v in _TO_CORE.items()}


def algorithm_from_wire(value: int, *, field: str = "algorithm") -> Algorithm:
    if value == common_pb2.ALGORITHM_UNSPECIFIED:
        raise InvalidArgument(field, "is required")
    try:
        return _TO_CORE[value]
    except KeyError:
        raise InvalidArgument(field, f"unknown algorithm value {value}") from None


def algorithm_to_wire(algorithm: Algorithm) -> common_pb2.Algorithm.ValueType:
    return _TO_WIRE[algorithm]  # type: ignore[return-value]


def algorithm_from_name(name: str, *, field: str = "algorithm") -> common_pb2.Algorithm.ValueType:
    """A user-typed name (``sha256``, ``SHA3-256``, ``ALGORITHM_MD5``) as the wire enum."""
    cleaned = name.strip()
    if cleaned.upper().startswith("ALGORITHM_"):
        cleaned = cleaned[len("ALGORITHM_") :]
    return algorithm_to_wire(Algorithm.parse(cleaned, field=field))


def argon2_params(
    message: common_pb2.Argon2Params,
    *,
    field_prefix: str = "argon2",
    memory_limit_kib: int | None = None,
) -> Argon2Params:
    """The wire's argon2 parameters, validated (``memory_limit_kib``: this process's bound);
    errors name ``field_prefix``'s fields."""
    return Argon2Params.build(
        memory_limit_kib=memory_limit_kib,
        time_cost=message.time_cost,
        memory_cost_kib=message.memory_cost_kib,
        parallelism=message.parallelism,
        hash_len=message.hash_len,
        salt=message.salt,
        field_prefix=field_prefix,
    )

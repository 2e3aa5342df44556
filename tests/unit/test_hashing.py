from __future__ import annotations

import hashlib

import argon2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashmesh.core.errors import InvalidArgument
from hashmesh.core.hashing import algorithms
from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params

DIGESTS = [a for a in Algorithm if a.is_digest]
HASHLIB_NAME = {a: a.value for a in DIGESTS}

CHEAP = dict(time_cost=1, memory_cost_kib=8 * 1024, parallelism=1)


@settings(max_examples=200, deadline=None)
@given(algorithm=st.sampled_from(DIGESTS), data=st.binary(max_size=5000))
def test_digest_equals_hashlib(algorithm: Algorithm, data: bytes) -> None:
    expected = hashlib.new(HASHLIB_NAME[algorithm], data).digest()
    assert algorithms.digest(algorithm, data) == expected
    streamed = algorithms.new_digest(algorithm)
    for start in range(0, len(data), 777):
        streamed.update(data[start : start + 777])
    assert streamed.digest() == expected
    assert algorithms.digest_matches(algorithm, data, expected.hex().upper())


def test_blake2b_is_the_64_byte_variant() -> None:
    assert len(algorithms.digest(Algorithm.BLAKE2B, b"")) == 64


@settings(max_examples=10, deadline=None)
@given(password=st.binary(max_size=64), salt=st.binary(min_size=8, max_size=32))
def test_argon2id_verifies_with_argon2_cffi(password: bytes, salt: bytes) -> None:
    params = Argon2Params.build(salt=salt, hash_len=24, **CHEAP)
    raw, encoded = algorithms.argon2id(password, params)
    assert argon2.PasswordHasher().verify(encoded, password)
    assert len(raw) == 24
    parsed = argon2.extract_parameters(encoded)
    assert (parsed.time_cost, parsed.memory_cost, parsed.parallelism) == (1, 8192, 1)
    assert algorithms.argon2id(password, params) == (raw, encoded)  # a given salt is deterministic


def test_argon2id_random_salt_differs_and_defaults_follow_rfc9106() -> None:
    params = Argon2Params.build()
    assert not params.deterministic
    assert (params.time_cost, params.memory_cost_kib, params.parallelism) == (3, 65536, 4)
    cheap = Argon2Params.build(**CHEAP)
    first = algorithms.argon2id(b"pw", cheap)
    second = algorithms.argon2id(b"pw", cheap)
    assert first != second


def test_argon2id_verify_and_needs_rehash() -> None:
    _, encoded = algorithms.argon2id(b"secret", Argon2Params.build(**CHEAP))
    assert algorithms.argon2id_verify(encoded, b"secret") == (True, True)
    assert algorithms.argon2id_verify(encoded, b"other")[0] is False
    _, default = algorithms.argon2id(b"secret", Argon2Params.build())
    assert algorithms.argon2id_verify(default, b"secret") == (True, False)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"time_cost": 11}, "argon2.time_cost"),
        ({"memory_cost_kib": 1024}, "argon2.memory_cost_kib"),
        ({"parallelism": 9}, "argon2.parallelism"),
        ({"hash_len": 8}, "argon2.hash_len"),
        ({"salt": b"short"}, "argon2.salt"),
    ],
)
def test_argon2_params_out_of_bounds_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        Argon2Params.build(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


@pytest.mark.parametrize(
    "encoded",
    ["", "$argon2id$", "not-a-phc", "$argon2i$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaA"],
)
def test_malformed_phc_is_invalid_argument(encoded: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        algorithms.validate_phc(encoded)
    assert caught.value.field == "encoded"


def test_digest_verify_rejects_bad_hex_and_wrong_length() -> None:
    with pytest.raises(InvalidArgument):
        algorithms.digest_matches(Algorithm.SHA256, b"x", "zz")
    with pytest.raises(InvalidArgument):
        algorithms.digest_matches(Algorithm.SHA256, b"x", "00" * 16)
    assert not algorithms.digest_matches(Algorithm.MD5, b"x", "00" * 16)


def test_argon2id_cannot_be_streamed() -> None:
    with pytest.raises(InvalidArgument) as caught:
        algorithms.new_digest(Algorithm.ARGON2ID)
    assert caught.value.field == "header.algorithm"


@settings(max_examples=100, deadline=None)
@given(chunk=st.binary(max_size=70_000))
def test_stream_deserializer_views_chunks_without_protobuf(chunk: bytes) -> None:
    from hashmesh.hashd.hash_service import parse_stream_message
    from hashmesh.v1 import common_pb2, hash_pb2

    raw = hash_pb2.HashStreamRequest(chunk=chunk).SerializeToString()
    parsed = parse_stream_message(raw)
    assert isinstance(parsed, memoryview) and parsed.tobytes() == chunk
    header = hash_pb2.HashStreamRequest(
        header=hash_pb2.HashStreamHeader(algorithm=common_pb2.ALGORITHM_MD5)
    )
    assert parse_stream_message(header.SerializeToString()) == header
    # A chunk followed by anything else is left to protobuf (here: a header after the chunk).
    mixed = parse_stream_message(raw + header.SerializeToString())
    assert isinstance(mixed, hash_pb2.HashStreamRequest)

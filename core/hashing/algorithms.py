"""The hash functions hashmesh computes, as pure functions over bytes (no I/O, no gRPC).

Digest algorithms wrap hashlib; Argon2id wraps argon2-cffi with bounds the server enforces.
Parameter validation raises ``InvalidArgument`` naming the request field."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import argon2
from argon2.low_level import Type, hash_secret

from hashmesh.core.errors import InvalidArgument, Violations


class Algorithm(str, Enum):
    """Algorithm names as stored in the database and shown to users (the proto enum's suffix,
    lowercased)."""

    MD5 = "md5"
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA512 = "sha512"
    SHA3_256 = "sha3_256"
    BLAKE2B = "blake2b"
    ARGON2ID = "argon2id"

    @property
    def is_digest(self) -> bool:
        return self is not Algorithm.ARGON2ID

    @classmethod
    def parse(cls, name: str, *, field: str = "algorithm") -> Algorithm:
        """A user-typed name: any case, ``-`` or ``_`` (``SHA3-256``, ``sha_256``, ``sha3256``)."""
        cleaned = name.strip().lower().replace("-", "_")
        cleaned = _ALIASES.get(cleaned, cleaned)
        try:
            return cls(cleaned)
        except ValueError:
            known = ", ".join(a.value for a in cls)
            raise InvalidArgument(
                field, f"unknown algorithm {name!r}; expected one of {known}"
            ) from None


_ALIASES = {"sha3256": "sha3_256", "sha_1": "sha1", "sha_256": "sha256", "sha_512": "sha512"}

# Direct constructors: hashlib.new(name) looks the name up on every call.
_CONSTRUCTORS: dict[Algorithm, Any] = {
    Algorithm.MD5: hashlib.md5,
    Algorithm.SHA1: hashlib.sha1,
    Algorithm.SHA256: hashlib.sha256,
    Algorithm.SHA512: hashlib.sha512,
    Algorithm.SHA3_256: hashlib.sha3_256,
    Algorithm.BLAKE2B: hashlib.blake2b,  # 64-byte digest, hashlib's default
}


def new_digest(algorithm: Algorithm, *, field: str = "header.algorithm") -> Any:
    """A fresh hashlib object for a digest algorithm (for streaming)."""
    constructor = _CONSTRUCTORS.get(algorithm)
    if constructor is None:
        raise InvalidArgument(field, "argon2id is a password hash and cannot be streamed")
    return constructor()


def digest(algorithm: Algorithm, data: bytes) -> bytes:
    """The raw digest of ``data``; hashlib releases the GIL for inputs over 2 KiB."""
    constructor = _CONSTRUCTORS.get(algorithm)
    if constructor is None:
        raise InvalidArgument("algorithm", "argon2id is not a digest algorithm")
    return bytes(constructor(data).digest())


# RFC 9106 second recommended option / OWASP: t=3, m=64 MiB, p=4.
DEFAULT_TIME_COST = 3
DEFAULT_MEMORY_KIB = 64 * 1024
DEFAULT_PARALLELISM = 4
DEFAULT_HASH_LEN = 32
DEFAULT_SALT_LEN = 16

BOUNDS: dict[str, tuple[int, int]] = {
    "time_cost": (1, 10),
    "memory_cost_kib": (8 * 1024, 256 * 1024),
    "parallelism": (1, 8),
    "hash_len": (16, 64),
}
SALT_BOUNDS = (8, 64)
MAX_PHC_LENGTH = 512
"""Longest PHC string read: the longest valid one (64-byte salt and hash) is under 250."""


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int = DEFAULT_TIME_COST
    memory_cost_kib: int = DEFAULT_MEMORY_KIB
    parallelism: int = DEFAULT_PARALLELISM
    hash_len: int = DEFAULT_HASH_LEN
    salt: bytes | None = None
    """Caller-supplied salt; ``None`` means a fresh random one per computation."""

    @classmethod
    def build(
        cls,
        *,
        time_cost: int = 0,
        memory_cost_kib: int = 0,
        parallelism: int = 0,
        hash_len: int = 0,
        salt: bytes = b"",
        field_prefix: str = "argon2",
        memory_limit_kib: int | None = None,
    ) -> Argon2Params:
        """Zeros take the defaults; out-of-bounds values raise ``InvalidArgument``, and so does
        a ``memory_cost_kib`` over ``memory_limit_kib`` (what this server's memory can hold)."""
        values = {
            "time_cost": time_cost or DEFAULT_TIME_COST,
            "memory_cost_kib": memory_cost_kib or DEFAULT_MEMORY_KIB,
            "parallelism": parallelism or DEFAULT_PARALLELISM,
            "hash_len": hash_len or DEFAULT_HASH_LEN,
        }
        violations = Violations()
        for name, value in values.items():
            low, high = BOUNDS[name]
            if not low <= value <= high:
                violations.add(
                    f"{field_prefix}.{name}", f"must be between {low} and {high}, got {value}"
                )
        over = memory_over_limit(values["memory_cost_kib"], memory_limit_kib)
        if (
            over
            and BOUNDS["memory_cost_kib"][0]
            <= values["memory_cost_kib"]
            <= BOUNDS["memory_cost_kib"][1]
        ):
            violations.add(f"{field_prefix}.memory_cost_kib", over)
        if BOUNDS["memory_cost_kib"][0] <= values["memory_cost_kib"] < 8 * values["parallelism"]:
            violations.add(
                f"{field_prefix}.memory_cost_kib", "must be at least 8 KiB per lane of parallelism"
            )
        if salt and not SALT_BOUNDS[0] <= len(salt) <= SALT_BOUNDS[1]:
            violations.add(
                f"{field_prefix}.salt",
                f"must be {SALT_BOUNDS[0]} to {SALT_BOUNDS[1]} bytes, got {len(salt)}",
            )
        violations.raise_if_any()
        return cls(salt=salt or None, **values)

    @property
    def deterministic(self) -> bool:
        """Only a caller-supplied salt makes the result repeatable (and so cacheable)."""
        return self.salt is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["salt"] = base64.b64encode(self.salt).decode() if self.salt else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Argon2Params:
        salt = data.get("salt")
        return cls(
            time_cost=int(data["time_cost"]),
            memory_cost_kib=int(data["memory_cost_kib"]),
            parallelism=int(data["parallelism"]),
            hash_len=int(data["hash_len"]),
            salt=base64.b64decode(salt) if salt else None,
        )


def argon2id(password: bytes, params: Argon2Params) -> tuple[bytes, str]:
    """(raw hash, PHC string). CPU- and memory-heavy: call from an executor."""
    salt = params.salt if params.salt is not None else os.urandom(DEFAULT_SALT_LEN)
    encoded = hash_secret(
        password,
        salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_cost_kib,
        parallelism=params.parallelism,
        hash_len=params.hash_len,
        type=Type.ID,
    ).decode("ascii")
    raw = _phc_raw_hash(encoded)
    return raw, encoded


def _phc_raw_hash(encoded: str) -> bytes:
    b64 = encoded.rsplit("$", 1)[-1]
    return base64.b64decode(b64 + "=" * (-len(b64) % 4))


_default_hasher = argon2.PasswordHasher(
    time_cost=DEFAULT_TIME_COST,
    memory_cost=DEFAULT_MEMORY_KIB,
    parallelism=DEFAULT_PARALLELISM,
    hash_len=DEFAULT_HASH_LEN,
    salt_len=DEFAULT_SALT_LEN,
    type=Type.ID,
)


def memory_over_limit(memory_cost_kib: int, limit_kib: int | None) -> str:
    """Why an argon2 call would need more memory than this server keeps for one (its memory
    limit shared by its argon2 threads), or ``""``."""
    if limit_kib is not None and memory_cost_kib > limit_kib:
        return (
            f"must be at most {limit_kib} KiB on this server (its memory limit holds that much "
            f"per argon2 thread), got {memory_cost_kib}"
        )
    return ""


def validate_phc(
    encoded: str, *, field: str = "encoded", memory_limit_kib: int | None = None
) -> argon2.Parameters:
    """Parse an Argon2 PHC string; malformed or out-of-bounds ones raise ``InvalidArgument``,
    as does a memory cost over ``memory_limit_kib``."""
    if len(encoded) > MAX_PHC_LENGTH or not encoded.isascii():
        raise InvalidArgument(
            field, f"not a valid Argon2 PHC string (ASCII, at most {MAX_PHC_LENGTH} characters)"
        )
    try:
        parsed = argon2.extract_parameters(encoded)
    except (argon2.exceptions.InvalidHashError, ValueError) as exc:
        raise InvalidArgument(field, "not a valid Argon2 PHC string") from exc
    if parsed.type is not Type.ID:
        raise InvalidArgument(field, "only argon2id PHC strings are accepted")
    for name, value in (
        ("time_cost", parsed.time_cost),
        ("memory_cost_kib", parsed.memory_cost),
        ("parallelism", parsed.parallelism),
    ):
        low, high = BOUNDS[name]
        if not low <= value <= high:
            raise InvalidArgument(
                field, f"{name}={value} is outside the server's bounds {low}..{high}"
            )
    over = memory_over_limit(parsed.memory_cost, memory_limit_kib)
    if over:
        raise InvalidArgument(field, over)
    return parsed


def argon2id_verify(encoded: str, password: bytes) -> tuple[bool, bool]:
    """(match, needs_rehash). CPU-heavy: call from an executor; call ``validate_phc`` first."""
    try:
        _default_hasher.verify(encoded, password)
    except argon2.exceptions.VerifyMismatchError:
        return False, False
    except argon2.exceptions.InvalidHashError as exc:
        raise InvalidArgument("encoded", "not a valid Argon2 PHC string") from exc
    except argon2.exceptions.VerificationError as exc:
        # Not a mismatch (caught above): libargon2 could not decode the string (a salt or
        # hash that is not base64, empty or too short), which is the caller's input at fault.
        if "memory" in str(exc).lower():
            raise
        raise InvalidArgument("encoded", f"not a valid Argon2 PHC string ({exc})") from exc
    return True, _default_hasher.check_needs_rehash(encoded)


def digest_matches(algorithm: Algorithm, data: bytes, expected_hex: str) -> bool:
    """Constant-time comparison of a digest with an expected hex string."""
    try:
        expected = bytes.fromhex(expected_hex.strip())
    except ValueError as exc:
        raise InvalidArgument("encoded", "must be a hex digest") from exc
    size = new_digest(algorithm, field="algorithm").digest_size
    if len(expected) != size:
        raise InvalidArgument(
            "encoded", f"a {algorithm.value} digest is {size} bytes ({2 * size} hex digits)"
        )
    return hmac.compare_digest(digest(algorithm, data), expected)

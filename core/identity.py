"""Who is calling: the identity stamp the balancer signs and the replicas verify (no I/O).

The balancer decides a caller's identity once (``hashmesh.balancer.interceptors.Identify``) and
sends it to the replica as two metadata entries:

- ``x-hashmesh-identity``: the identity, e.g. ``alice`` (an API key's client) or
  ``ip:127.0.0.2`` (a peer address);
- ``x-hashmesh-identity-sig``: ``v1;<role>;<expires>;<hex>``, where ``role`` is ``client`` or
  ``operator``, ``expires`` a Unix time in seconds, and ``hex`` the HMAC-SHA256, under the
  mesh's ``HASHMESH_IDENTITY_SECRET``, of (version, role, expires, method, identity).

The signature binds the method, so a stamp seen on one call cannot promote another method,
and expires after ``STAMP_TTL`` to ``STAMP_TTL + STAMP_BUCKET`` seconds. Replicas verify it in
``hashmesh.hashd.identity`` and otherwise take the direct caller's address; they never read an
identity from a header or body the caller chose."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

IDENTITY = "x-hashmesh-identity"
IDENTITY_SIG = "x-hashmesh-identity-sig"
STAMP_HEADERS = frozenset({IDENTITY, IDENTITY_SIG})
AUTHORIZATION = "authorization"

VERSION = "v1"
ROLES = ("client", "operator")
STAMP_TTL = 60
"""Seconds a stamp stays valid at least (covers the longest retry of one call's attempts)."""
STAMP_BUCKET = 10
"""Stamps are made per 10-second bucket, so the balancer signs each (identity, method) once
per bucket instead of once per call."""
MAX_CLOCK_SKEW = 120
"""A stamp expiring further ahead than TTL + bucket + this is refused: a replica's clock may
lag the balancer's by up to this many seconds."""
MAX_IDENTITY_LENGTH = 200
ADDRESS_PREFIX = "ip:"
MIN_SECRET_LENGTH = 16
_EXPIRES = re.compile(r"[0-9]{1,20}")


class StampError(ValueError):
    """A stamp that does not verify; the message says why (never echoes the secret)."""


@dataclass(frozen=True)
class Caller:
    """The identity a replica acts for, and whether it may see every tenant."""

    identity: str
    operator: bool = False

    @property
    def scope(self) -> str | None:
        """The tenant a task query is limited to; ``None`` (every tenant) for an operator."""
        return None if self.operator else self.identity


def address_identity(host: str) -> str:
    """``ip:<host>``: the identity of a caller known only by its address (not its port, so
    one peer's connections share one identity)."""
    return ADDRESS_PREFIX + host


def host_of(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` → ``127.0.0.1``; ``ipv6:[::1]:5000`` → ``::1``;
    ``unix:/path`` → ``unix:/path``."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or not rest:
        return peer
    return rest.rsplit(":", 1)[0].strip("[]")


def valid_identity(value: str) -> bool:
    """Printable ASCII without spaces (a metadata value anyone can log), at most 200 chars."""
    return 0 < len(value) <= MAX_IDENTITY_LENGTH and all("!" <= ch <= "~" for ch in value)


def parse_networks(
    items: Sequence[str], setting: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDR ranges (``10.0.0.0/8``, ``::1/128``); a bare address is a /32 or /128."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{setting}: {item!r} is not an address or CIDR range") from exc
    return tuple(networks)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of ``authorization: Bearer <token>``, the scheme matched case-insensitively
    (RFC 9110 §11.1); ``""`` for an authorization header of another form; ``None`` without one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            if not isinstance(value, str):
                return ""
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def token_matches(presented: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())


def _mac(secret: bytes, role: str, expires: int, method: str, identity: str) -> str:
    message = "\x00".join((VERSION, role, str(expires), method, identity)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class Stamper:
    """Signs stamps for the balancer, remembering those of the current time bucket (bounded)."""

    def __init__(
        self, secret: str, *, clock: Callable[[], float] = time.time, cache_size: int = 8192
    ) -> None:
        self._secret = secret.encode()
        self._clock = clock
        self._cache_size = cache_size
        self._bucket = -1
        self._cache: dict[tuple[str, str, str], tuple[tuple[str, str], tuple[str, str]]] = {}

    def stamp(
        self, identity: str, method: str, *, operator: bool = False
    ) -> tuple[tuple[str, str], tuple[str, str]]:
        """The two metadata entries to send with a call of ``method`` made for ``identity``."""
        bucket = int(self._clock()) // STAMP_BUCKET
        if bucket != self._bucket:
            self._bucket = bucket
            self._cache.clear()
        role = ROLES[operator]
        key = (identity, role, method)
        entries = self._cache.get(key)
        if entries is None:
            expires = (bucket + 1) * STAMP_BUCKET + STAMP_TTL
            signature = (
                f"{VERSION};{role};{expires};{_mac(self._secret, role, expires, method, identity)}"
            )
            entries = ((IDENTITY, identity), (IDENTITY_SIG, signature))
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = entries
        return entries


def verify(secret: str, identity: str, signature: str, method: str, now: float) -> Caller:
    """The caller a stamp vouches for, or ``StampError``."""
    parts = signature.split(";")
    # ASCII digits only, and few: str.isdigit() also accepts "²" (which int() refuses) and
    # int() refuses more than 4300 digits; either would escape as a traceback, not a status.
    if (
        len(parts) != 4
        or parts[0] != VERSION
        or parts[1] not in ROLES
        or not _EXPIRES.fullmatch(parts[2])
    ):
        raise StampError("malformed identity stamp")
    role, expires = parts[1], int(parts[2])
    expected = _mac(secret.encode(), role, expires, method, identity)
    if not hmac.compare_digest(expected, parts[3]):
        raise StampError(
            "identity stamp signature does not verify (HASHMESH_IDENTITY_SECRET differs?)"
        )
    if expires < now:
        raise StampError(
            "identity stamp expired (are the balancer's and replica's clocks in sync?)"
        )
    if expires > now + STAMP_TTL + STAMP_BUCKET + MAX_CLOCK_SKEW:
        raise StampError("identity stamp expires too far ahead (clock skew?)")
    if not valid_identity(identity):
        raise StampError("identity stamp names an invalid identity")
    return Caller(identity, operator=role == "operator")

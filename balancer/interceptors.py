"""Interceptors: the checks a call passes before it is forwarded, each doing one thing.

``build_chain`` is the one place their order is written down:

1. ``Identify``  — who the caller is: the client of its API key when keys are on (a missing or
   wrong key → UNAUTHENTICATED), else ``x-client-id`` or the caller's address.
2. ``RateLimit`` — one token from that client's bucket, or RESOURCE_EXHAUSTED at once.

They run inside the proxy's handler rather than as ``grpc.aio.ServerInterceptor``s: a grpc.aio
interceptor cannot see the caller's address (only metadata), and wrapping every handler adds
a coroutine layer per call to the hottest path in the balancer. AdminService, which is not on
the hot path, is guarded by a real ``grpc.aio.ServerInterceptor`` (``AdminAuth``)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc

from hashmesh.balancer.keys import ApiKeys
from hashmesh.balancer.ratelimit import RateLimited, RateLimiter
from hashmesh.balancer.stats import BalancerStats
from hashmesh.core.errors import PermissionDenied, Unauthenticated
from hashmesh.core.rpc import abort_with

CLIENT_ID = "x-client-id"
API_KEY = "x-api-key"
FORWARDED_FOR = "x-forwarded-for"
AUTHORIZATION = "authorization"
ADMIN_PREFIX = "/hashmesh.v1.AdminService/"

# Not forwarded: connection-level headers (RFC 9110 §7.6.1), those gRPC sets per hop, and the
# client's API key (a credential for the balancer alone).
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authorization", "te",
        "transfer-encoding", "upgrade", "host", "user-agent", "content-type", "grpc-timeout",
        "grpc-encoding", "grpc-accept-encoding", API_KEY,
    }
)


class CallInfo:
    """What interceptors and the proxy know about one incoming call."""

    __slots__ = ("address", "api_key", "client", "client_id", "hash_value", "metadata", "method",
                 "reply_metadata")

    def __init__(self, method: str, address: str) -> None:
        self.method = method
        self.address = address
        self.client_id: str | None = None
        self.api_key: str | None = None
        self.hash_value: str | None = None
        self.client = ""
        self.metadata: list[tuple[str, str | bytes]] = []
        self.reply_metadata: tuple[tuple[str, str], ...] = ()


def read_call(
    method: str, address: str, incoming: Sequence[tuple[str, str | bytes]] | None, hash_key: str
) -> CallInfo:
    """One pass over the request metadata: what is forwarded, and the few keys we read."""
    call = CallInfo(method, address)
    forwarded = call.metadata
    prior_hops = ""
    for key, value in incoming or ():
        if key in HOP_BY_HOP:
            if key == API_KEY:
                call.api_key = value if isinstance(value, str) else None
            continue
        if key == FORWARDED_FOR:
            prior_hops = f"{value}, " if isinstance(value, str) else ""
            continue
        if key == CLIENT_ID and isinstance(value, str):
            call.client_id = value
        if key == hash_key and isinstance(value, str):
            call.hash_value = value
        forwarded.append((key, value))
    forwarded.append((FORWARDED_FOR, prior_hops + _host_of(address)))
    return call


_hosts: dict[str, str] = {}


def _host_of(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` → ``127.0.0.1``; ``ipv6:[::1]:5000`` → ``::1``. Remembered per
    connection (the peer string), since every call on a connection asks again."""
    host = _hosts.get(peer)
    if host is None:
        _, _, rest = peer.partition(":")
        host = (rest.rsplit(":", 1)[0] if rest else peer).strip("[]")
        if len(_hosts) > 10_000:
            _hosts.clear()
        _hosts[peer] = host
    return host


class CallInterceptor(Protocol):
    async def admit(self, call: CallInfo) -> None:
        """Raise a ``HashmeshError`` to refuse the call; may add ``call.reply_metadata``."""


class Identify:
    """Sets ``call.client``. With API keys, the key decides and overrides ``x-client-id``
    (also in the metadata sent to the replica, so its per-client quotas hold too)."""

    def __init__(self, keys: ApiKeys | None, peer_from: str, stats: BalancerStats) -> None:
        self._keys = keys
        self._by_address = peer_from == "address"
        self._stats = stats

    async def admit(self, call: CallInfo) -> None:
        keys = self._keys
        if keys is None:
            if self._by_address or not call.client_id:
                call.client = _host_of(call.address)
            else:
                call.client = call.client_id
            return
        client = keys.client_for(call.api_key) if call.api_key else None
        if client is None:
            self._stats.unauthenticated += 1
            if call.api_key is None:
                raise Unauthenticated("a valid x-api-key is required", reason="API_KEY_MISSING")
            raise Unauthenticated("unknown API key", reason="API_KEY_INVALID")
        call.client = client
        call.metadata = [kv for kv in call.metadata if kv[0] != CLIENT_ID]
        call.metadata.append((CLIENT_ID, client))


class RateLimit:
    """One token from the caller's bucket; the allowance (IETF RateLimit fields) goes back in
    the answer's initial metadata, refusals included."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def admit(self, call: CallInfo) -> None:
        try:
            allowance = await self._limiter.admit(call.client)
        except RateLimited as refusal:
            call.reply_metadata = refusal.allowance.metadata()
            raise
        if allowance is not None:
            call.reply_metadata = allowance.metadata()


def build_chain(
    keys: ApiKeys | None, peer_from: str, limiter: RateLimiter, stats: BalancerStats
) -> tuple[CallInterceptor, ...]:
    """The order of the interceptors, outermost first."""
    return (Identify(keys, peer_from, stats), RateLimit(limiter))


# -- AdminService -----------------------------------------------------------------------------


class AdminPolicy:
    """Who may call AdminService on one listener."""

    def __init__(self, token: str, *, open_without_token: bool) -> None:
        self._token = token
        self._open = open_without_token

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        if not self._token:
            if self._open:
                return
            raise PermissionDenied("AdminService is served only on the admin listener (loopback)",
                                   reason="ADMIN_LISTENER_ONLY")
        presented = next((v for k, v in metadata or () if k == AUTHORIZATION), None)
        if not isinstance(presented, str) or not presented.startswith("Bearer "):
            raise Unauthenticated("AdminService needs 'authorization: Bearer <admin token>'",
                                  reason="ADMIN_TOKEN_MISSING")
        if not hmac.compare_digest(presented[len("Bearer "):].encode(), self._token.encode()):
            raise Unauthenticated("wrong admin token", reason="ADMIN_TOKEN_INVALID")


def refusing_handler(error: Exception) -> grpc.RpcMethodHandler:
    """A unary handler that only answers ``error`` (AdminService methods are all unary)."""
    from hashmesh.core.errors import HashmeshError

    assert isinstance(error, HashmeshError)

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await abort_with(context, error)
        return b""

    return grpc.unary_unary_rpc_method_handler(refuse)


class AdminAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Guards AdminService on the admin listener; health and reflection stay open there."""

    def __init__(self, policy: AdminPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(ADMIN_PREFIX):
            try:
                self._policy.check(details.invocation_metadata)
            except (Unauthenticated, PermissionDenied) as error:
                return refusing_handler(error)
        return await continuation(details)

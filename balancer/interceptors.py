"""Interceptors: the checks a call passes before it is forwarded, each doing one thing.

``build_chain`` is the one place their order is written down:

1. ``Identify``  — who the caller is, decided here once for the whole mesh: the client of its
   API key when keys are on (a missing or wrong key → UNAUTHENTICATED); else, for a caller in
   ``trusted_proxies``, the ``x-client-id`` or the first untrusted ``x-forwarded-for`` hop it
   vouches for; else the caller's address as ``ip:<host>``. A valid
   ``authorization: Bearer <admin token>`` adds the operator role (a wrong one →
   UNAUTHENTICATED). A refused credential costs a token of the caller's address.
2. ``RateLimit`` — one token from that identity's bucket, or RESOURCE_EXHAUSTED at once.
3. ``Stamp``     — the identity goes to the replica signed (``hashmesh.core.identity``); any
   stamp, ``x-client-id``, API key or bearer token the caller sent is never forwarded.

They run inside the proxy's handler rather than as ``grpc.aio.ServerInterceptor``s: a grpc.aio
interceptor cannot see the caller's address (only metadata), and wrapping every handler adds
a coroutine layer per call to the hottest path in the balancer. AdminService, which is not on
the hot path, is guarded by a real ``grpc.aio.ServerInterceptor`` (``AdminAuth``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NoReturn, Protocol

import grpc

from hashmesh.balancer.keys import ApiKeys
from hashmesh.balancer.ratelimit import RateLimited, RateLimiter
from hashmesh.balancer.stats import BalancerStats
from hashmesh.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from hashmesh.core.handlers import Context, Handler
from hashmesh.core.identity import (
    ADDRESS_PREFIX,
    AUTHORIZATION,
    STAMP_HEADERS,
    Stamper,
    address_identity,
    bearer_token,
    host_of,
    parse_networks,
    token_matches,
    valid_identity,
)
from hashmesh.core.rpc import abort_with

CLIENT_ID = "x-client-id"
API_KEY = "x-api-key"
FORWARDED_FOR = "x-forwarded-for"
ADMIN_PREFIX = "/hashmesh.v1.AdminService/"

# Not forwarded: connection-level headers (RFC 9110 §7.6.1), those gRPC sets per hop, the
# caller's credentials (for the balancer alone), and what a caller might say about who it is
# (the replica hears that from the stamp only).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "transfer-encoding",
        "upgrade",
        "host",
        "user-agent",
        "content-type",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        API_KEY,
        AUTHORIZATION,
        CLIENT_ID,
        *STAMP_HEADERS,
    }
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CallInfo:
    """What interceptors and the proxy know about one incoming call."""

    __slots__ = (
        "address",
        "api_key",
        "bearer",
        "client",
        "client_id",
        "forwarded_for",
        "hash_value",
        "metadata",
        "method",
        "operator",
        "ratelimit",
        "unary_headers",
    )

    def __init__(self, method: str, address: str) -> None:
        self.method = method
        self.address = address
        self.client_id: str | None = None
        self.api_key: str | None = None
        self.bearer: str | None = None
        self.forwarded_for = ""
        self.hash_value: str | None = None
        self.client = ""
        self.operator = False
        self.metadata: list[tuple[str, str | bytes]] = []
        self.ratelimit: tuple[tuple[str, str], ...] = ()
        """The IETF RateLimit fields of the answer: in every answer's trailers, and in the
        headers of refusals and streams."""
        self.unary_headers: tuple[tuple[str, str], ...] = ()
        """What a successful or relayed unary answer adds to its headers: ``ratelimit`` near
        exhaustion (or always, by setting), else nothing (``balancer.ratelimit_fields``)."""


def read_call(
    method: str, address: str, incoming: Iterable[tuple[str, str | bytes]] | None, hash_key: str
) -> CallInfo:
    """One pass over the request metadata: what is forwarded, and the few keys we read."""
    call = CallInfo(method, address)
    forwarded = call.metadata
    for key, value in incoming or ():
        if key == hash_key and isinstance(value, str):
            call.hash_value = value
        if key in HOP_BY_HOP:
            if key == API_KEY:
                call.api_key = value if isinstance(value, str) else None
            elif key == AUTHORIZATION:
                call.bearer = bearer_token(((key, value),))
            elif key == CLIENT_ID and isinstance(value, str):
                call.client_id = value
            continue
        if key == FORWARDED_FOR:
            call.forwarded_for = value if isinstance(value, str) else ""
            continue
        forwarded.append((key, value))
    prior_hops = f"{call.forwarded_for}, " if call.forwarded_for else ""
    forwarded.append((FORWARDED_FOR, prior_hops + _host_of(address)))
    return call


_hosts: dict[str, str] = {}


def _host_of(peer: str) -> str:
    """``host_of``, remembered per connection (the peer string), since every call on a
    connection asks again."""
    host = _hosts.get(peer)
    if host is None:
        host = host_of(peer)
        if len(_hosts) > 10_000:
            _hosts.clear()
        _hosts[peer] = host
    return host


class CallInterceptor(Protocol):
    async def admit(self, call: CallInfo) -> None:
        """Raise a ``HashmeshError`` to refuse the call; may set ``call.ratelimit``."""


def _plain(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4-mapped IPv6 address (a dual-stack socket's spelling of an IPv4 peer) as IPv4."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


class TrustedProxies:
    """Which addresses may speak for the callers behind them (bounded memo per address)."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self._networks = tuple(networks)
        self._seen: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, host: str) -> bool:
        known = self._seen.get(host)
        if known is None:
            try:
                address = _plain(ipaddress.ip_address(host))
            except ValueError:
                known = False
            else:
                known = any(address in network for network in self._networks)
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen[host] = known
        return known

    def origin(self, forwarded_for: str) -> str | None:
        """The rightmost ``x-forwarded-for`` hop that is not one of ours (the hops to its
        left were written by callers nobody vouches for); ``None`` if a hop is malformed."""
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        address = None
        for hop in reversed(hops):
            try:  # one spelling per address: '::ffff:10.0.0.1' is 10.0.0.1
                address = str(_plain(ipaddress.ip_address(hop)))
            except ValueError:
                return None
            if not self.trusts(address):
                return address
        return address


class Identify:
    """Sets ``call.client`` (the identity) and ``call.operator``; see the module docstring."""

    def __init__(
        self,
        keys: ApiKeys | None,
        trusted: TrustedProxies,
        admin_token: str,
        stats: BalancerStats,
        limiter: RateLimiter,
    ) -> None:
        self._keys = keys
        self._trusted = trusted
        self._admin_token = admin_token
        self._stats = stats
        self._limiter = limiter

    async def admit(self, call: CallInfo) -> None:
        if call.bearer is not None and self._admin_token:
            if not token_matches(call.bearer, self._admin_token):
                await self._refuse(
                    call,
                    "wrong admin token (authorization: Bearer <HASHMESH_ADMIN_TOKEN>)",
                    reason="ADMIN_TOKEN_INVALID",
                )
            call.operator = True
        keys = self._keys
        if keys is not None and (call.api_key is not None or not call.operator):
            client = keys.client_for(call.api_key) if call.api_key else None
            if client is None:
                if call.api_key is None:
                    await self._refuse(
                        call, "a valid x-api-key is required", reason="API_KEY_MISSING"
                    )
                await self._refuse(call, "unknown API key", reason="API_KEY_INVALID")
            call.client = client
            return
        host = _host_of(call.address)
        if self._trusted and self._trusted.trusts(host):
            call.client = self._vouched(call) or address_identity(host)
            return
        call.client = address_identity(host)

    async def _refuse(self, call: CallInfo, message: str, *, reason: str) -> NoReturn:
        """UNAUTHENTICATED, for a token of the caller's address first (RESOURCE_EXHAUSTED when
        spent): credentials cannot be guessed faster than the rate limit."""
        await self._limiter.admit(address_identity(_host_of(call.address)))
        self._stats.unauthenticated += 1
        raise Unauthenticated(message, reason=reason)

    def _vouched(self, call: CallInfo) -> str | None:
        """The identity a trusted proxy states for its caller."""
        if call.client_id:
            if not valid_identity(call.client_id) or call.client_id.startswith(ADDRESS_PREFIX):
                raise InvalidArgument(
                    CLIENT_ID,
                    "must be 1-200 printable ASCII characters without spaces, "
                    f"not starting with {ADDRESS_PREFIX!r}",
                )
            return call.client_id
        origin = self._trusted.origin(call.forwarded_for) if call.forwarded_for else None
        return address_identity(origin) if origin else None


class RateLimit:
    """One token from the caller's bucket; the allowance (IETF RateLimit fields) goes back in
    the answer's trailers, and in its headers on a refusal, on a stream, and on a unary answer
    near exhaustion or when ``always_in_headers``."""

    def __init__(self, limiter: RateLimiter, *, always_in_headers: bool = False) -> None:
        self._limiter = limiter
        self._always = always_in_headers

    async def admit(self, call: CallInfo) -> None:
        try:
            allowance = await self._limiter.admit(call.client)
        except RateLimited as refusal:
            call.ratelimit = refusal.allowance.metadata()
            raise
        if allowance is not None:
            fields = call.ratelimit = allowance.metadata()
            if self._always or allowance.near_exhaustion:
                call.unary_headers = fields


class Stamp:
    """Signs the identity for the replica (``hashmesh.core.identity``)."""

    def __init__(self, stamper: Stamper) -> None:
        self._stamper = stamper

    async def admit(self, call: CallInfo) -> None:
        call.metadata.extend(self._stamper.stamp(call.client, call.method, operator=call.operator))


def build_chain(
    keys: ApiKeys | None,
    limiter: RateLimiter,
    stats: BalancerStats,
    *,
    trusted_proxies: Sequence[str] = (),
    admin_token: str = "",
    identity_secret: str = "",
    ratelimit_headers: str = "near",
) -> tuple[CallInterceptor, ...]:
    """The order of the interceptors, outermost first. Without a secret (only in-process
    tests: the daemon refuses to start without one) calls go unstamped."""
    trusted = TrustedProxies(parse_networks(trusted_proxies, "HASHMESH_BALANCER_TRUSTED_PROXIES"))
    chain: list[CallInterceptor] = [
        Identify(keys, trusted, admin_token, stats, limiter),
        RateLimit(limiter, always_in_headers=ratelimit_headers == "always"),
    ]
    if identity_secret:
        chain.append(Stamp(Stamper(identity_secret)))
    return tuple(chain)


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
            raise PermissionDenied(
                "AdminService is served only on the admin listener (loopback)",
                reason="ADMIN_LISTENER_ONLY",
            )
        presented = bearer_token(metadata)
        if not presented:
            raise Unauthenticated(
                "AdminService needs 'authorization: Bearer <admin token>'",
                reason="ADMIN_TOKEN_MISSING",
            )
        if not token_matches(presented, self._token):
            raise Unauthenticated("wrong admin token", reason="ADMIN_TOKEN_INVALID")


def refusing_handler(error: Exception) -> Handler:
    """A unary handler that only answers ``error`` (AdminService methods are all unary)."""
    from hashmesh.core.errors import HashmeshError

    assert isinstance(error, HashmeshError)

    async def refuse(request: bytes, context: Context) -> bytes:
        await abort_with(context, error)
        return b""

    return grpc.unary_unary_rpc_method_handler(refuse)


class AdminAuth(grpc.aio.ServerInterceptor):
    """Guards AdminService on the admin listener; health and reflection stay open there."""

    def __init__(self, policy: AdminPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        if details.method.startswith(ADMIN_PREFIX):
            try:
                self._policy.check(details.invocation_metadata)
            except (Unauthenticated, PermissionDenied) as error:
                return refusing_handler(error)
        return await continuation(details)

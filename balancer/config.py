"""Settings of the balancer: ``BalancerSettings.from_env()`` then command-line flags."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from hashmesh.balancer.affinity import parse_cpus
from hashmesh.balancer.budgets import BudgetSettings
from hashmesh.balancer.connections import ConnectionSettings
from hashmesh.core.identity import MIN_SECRET_LENGTH, parse_networks
from hashmesh.core.settings import (
    SettingsError,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_optional,
    env_str,
)
from hashmesh.core.tls import ClientTls, ServerTls

STRATEGIES = ("round_robin", "least_connections", "p2c_ewma", "consistent_hash")
RATELIMIT_HEADERS = ("near", "always")

# Safe to replay after UNAVAILABLE: they change nothing (HashStream is idempotent too, but a
# stream cannot be replayed once a chunk was sent, so it is retried only before that).
DEFAULT_IDEMPOTENT = (
    "/hashmesh.v1.HashService/ComputeHash",
    "/hashmesh.v1.HashService/Hash",
    "/hashmesh.v1.HashService/Verify",
    "/hashmesh.v1.TaskService/GetTask",
    "/hashmesh.v1.TaskService/ListTasks",
    "/hashmesh.v1.TaskService/GetQueueStats",
    "/hashmesh.v1.CacheService/GetCacheStats",
)


MIN_RATE = 1e-3
"""Slowest rate limit: one call per 1,000 s."""
MAX_RATE = 1e9
"""Fastest rate limit (far above what one process can proxy)."""


@dataclass(frozen=True)
class RateLimitSettings:
    """A token bucket: ``rate`` calls per second sustained, ``burst`` at once."""

    rate: float
    """Sustained calls per second, ``MIN_RATE`` to ``MAX_RATE``."""
    burst: int = 0
    """Calls allowed at once above the sustained rate; 0 means ``max(1, rate)``."""

    def __post_init__(self) -> None:
        # Outside these bounds the bucket breaks: infinite rate divides by zero, a vanishing
        # one makes retry-after overflow (every proxied call would fail).
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise SettingsError(
                f"rate limit must be between {MIN_RATE:g} and {MAX_RATE:g} calls/s, got {self.rate}"
            )
        if self.burst < 0:
            raise SettingsError(f"burst must be >= 0, got {self.burst}")

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst else max(1.0, self.rate)


def parse_overrides(raw: tuple[str, ...]) -> dict[str, RateLimitSettings]:
    """``client=rate[/burst]`` items, e.g. ``batch-7=500/1000``."""
    overrides: dict[str, RateLimitSettings] = {}
    for item in raw:
        client, sep, spec = item.partition("=")
        if not sep or not client:
            raise SettingsError(f"rate limit override {item!r} is not client=rate[/burst]")
        rate, _, burst = spec.partition("/")
        try:
            overrides[client] = RateLimitSettings(float(rate), int(burst or 0))
        except ValueError as exc:
            raise SettingsError(f"rate limit override {item!r}: {exc}") from exc
    return overrides


_METADATA_KEY = re.compile(r"[0-9a-z_.-]{1,100}")


def is_hash_key(key: str) -> bool:
    """A text metadata key consistent hashing can read: lowercase, not binary, not grpc's own."""
    return (
        bool(_METADATA_KEY.fullmatch(key))
        and not key.endswith("-bin")
        and not key.startswith("grpc-")
    )


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class BalancerSettings:
    """Everything one balancer process needs. Field docstrings name the environment variable
    (``HASHMESH_`` prefix omitted) and the flag."""

    listen: str = "127.0.0.1:50050"
    """host:port for clients; port 0 picks a free one (``BALANCER_LISTEN``, ``--listen``)."""
    reuse_port: bool = False
    """Bind ``listen`` with SO_REUSEPORT, so several balancer processes share one port and the
    kernel spreads connections among them (``BALANCER_REUSE_PORT``, ``--reuse-port``). Each
    process still needs an admin listener of its own."""
    admin_listen: str = "127.0.0.1:50060"
    """host:port of the admin listener (AdminService, health, reflection). Without an admin
    token it must be loopback (``BALANCER_ADMIN_LISTEN``, ``--admin-listen``)."""
    admin_token: str = ""
    """The operator's bearer token (``ADMIN_TOKEN``). Set: required for AdminService on both
    listeners, and a proxied call carrying it is stamped as the operator's (a wrong one is
    UNAUTHENTICATED). Empty: AdminService answers only on the loopback admin listener, and no
    proxied call is the operator's."""
    backends: tuple[str, ...] = ()
    """Static replica addresses (``BALANCER_BACKENDS``, ``--backends a,b,c``)."""
    backends_dns: tuple[str, ...] = ()
    """``name:port`` entries re-resolved every ``dns_interval`` seconds, e.g. a Kubernetes
    headless service (``BALANCER_BACKENDS_DNS``, ``--backends-dns``)."""
    dns_interval: float = 5.0
    """Seconds between DNS re-resolutions (``BALANCER_DNS_INTERVAL``)."""
    strategy: str = "least_connections"
    """Picking policy at start: one of ``STRATEGIES`` (``BALANCER_STRATEGY``, ``--strategy``)."""
    hash_key: str = "x-client-id"
    """Metadata key hashed by ``consistent_hash`` (``BALANCER_HASH_KEY``)."""
    health_interval: float = 1.0
    """Seconds between grpc.health.v1 checks of each replica (``BALANCER_HEALTH_INTERVAL``)."""
    health_timeout: float = 1.0
    """Timeout of one health check (``BALANCER_HEALTH_TIMEOUT``)."""
    eject_after: int = 3
    """Consecutive connection failures that eject a replica until a health check passes
    (``BALANCER_EJECT_AFTER``)."""
    max_in_flight_per_backend: int = 512
    """Calls in flight to one replica before picks spill to others; when all are full calls
    fail fast with UNAVAILABLE (``BALANCER_MAX_IN_FLIGHT``)."""
    max_streams_per_backend: int = 1024
    """Streams (every kind but unary) in flight to one replica; counted apart from
    ``max_in_flight_per_backend`` so held streams never take the unary calls' slots
    (``BALANCER_MAX_STREAMS_PER_BACKEND``)."""
    attempt_timeout: float = 10.0
    """Seconds one attempt of an idempotent unary call may take before it is abandoned and
    retried on another replica (gRFC A6 per-attempt timeout); a frozen replica costs a call
    at most this. 0 turns it off (``BALANCER_ATTEMPT_TIMEOUT``)."""
    state_file: str = ""
    """File where strategy, rate limits and drains set through AdminService are kept and
    read back at start; empty: run-time changes are lost at restart (``BALANCER_STATE_FILE``,
    ``--state-file``)."""
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    """Per-peer and total budgets of calls, streams and bytes (``balancer.budgets``)."""
    connections: ConnectionSettings = field(default_factory=ConnectionSettings)
    """Connection limits of the public listener (``balancer.connections``)."""
    idempotent_methods: tuple[str, ...] = DEFAULT_IDEMPOTENT
    """Full method names retried after UNAVAILABLE (``BALANCER_IDEMPOTENT_METHODS``)."""
    retry_budget_ratio: float = 0.2
    """Retries allowed as a fraction of calls (``BALANCER_RETRY_RATIO``)."""
    retry_budget_min: float = 10.0
    """Retries always allowed per second whatever the call rate (``BALANCER_RETRY_MIN``)."""
    max_attempts: int = 3
    """Most attempts (first call included) for one call (``BALANCER_MAX_ATTEMPTS``)."""
    rate_limit: RateLimitSettings | None = None
    """Default per-peer limit; ``None`` turns rate limiting off (``BALANCER_RATE_LIMIT`` as
    ``rate[/burst]``, ``--rate-limit``)."""
    rate_limit_overrides: dict[str, RateLimitSettings] = field(default_factory=dict)
    """Per-client limits (``BALANCER_RATE_LIMIT_OVERRIDES`` as ``id=rate[/burst],...``)."""
    ratelimit_headers: str = "near"
    """Where a unary answer carries the IETF RateLimit fields besides its trailers (which
    always have them): ``near`` — also in the initial metadata once the caller's quota is close
    to exhaustion (``balancer.ratelimit_fields.near_exhaustion``), and on every refusal;
    ``always`` — in the initial metadata of every answer, which costs grpc.aio one more batch
    per call (``BALANCER_RATELIMIT_HEADERS``, ``--ratelimit-headers``)."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or CIDR ranges of proxies in front of the balancer whose ``x-client-id`` and
    ``x-forwarded-for`` are believed; empty: nobody's (``BALANCER_TRUSTED_PROXIES``, e.g.
    ``10.0.0.0/8,::1``). Every other caller is its API key's client, else ``ip:<address>``."""
    identity_secret: str = ""
    """HMAC key of the identity stamp sent to the replicas; every balancer and hashd of a mesh
    holds the same one, at least 16 characters (``IDENTITY_SECRET``). The daemon refuses to
    start without it; ``hashctl up`` makes one per run."""
    limiter_table_size: int = 20_000
    """Most peers with a limiter at once; the least recently seen is evicted first
    (``BALANCER_LIMITER_TABLE_SIZE``)."""
    redis_url: str = ""
    """Share every client's limit among all balancer processes through this Redis
    (``redis://[:password@]host:port/db``); empty: each process limits alone. While Redis is
    down each process falls back to its own buckets (``BALANCER_REDIS_URL``, ``--redis-url``)."""
    redis_timeout: float = 0.25
    """Seconds one Redis request may take before the limiter fails open to local buckets
    (``BALANCER_REDIS_TIMEOUT``)."""
    redis_lease_seconds: float = 0.02
    """Tokens a process takes from Redis at once, in seconds of the client's rate (at least
    one, at most a quarter of the burst): larger asks Redis less often, smaller is exacter
    (``BALANCER_REDIS_LEASE``)."""
    tunnel: bool = True
    """Send small unary calls to each replica over one long-lived stream, batched
    (``hashmesh.core.tunnel``); off: one gRPC call per call (``BALANCER_TUNNEL``)."""
    tunnel_socket: bool = True
    """Tunnel calls over the plain socket a plaintext replica offers on its tunnel stream
    (``hashmesh.core.tunnel_socket``; never with upstream TLS); off: over the stream itself
    (``BALANCER_TUNNEL_SOCKET``)."""
    api_keys_file: str = ""
    """File of ``client_id sha256:<hex>`` lines; set: every proxied call needs a valid
    ``x-api-key`` and the limiter keys on its client (``BALANCER_API_KEYS_FILE``)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """The mesh's unary input limit (``MAX_MESSAGE_BYTES``); see ``wire_message_bytes``."""
    grace_seconds: float = 10.0
    """On SIGTERM, seconds in-flight calls get to finish (``GRACE_SECONDS``)."""
    cpus: tuple[int, ...] | str = "auto"
    """CPUs the process is pinned to at start (``balancer.affinity``): ``auto`` — one allowed
    CPU, the ``cpu_index``-th from the last (the default: the synchronous listener's threads
    hand the GIL to one another several times per call, which costs ~2x as much across cores),
    empty — none, or CPU numbers (``BALANCER_CPUS``, ``--cpus``: ``auto``, ``off``, ``1``,
    ``0,2``, ``2-3``)."""
    cpu_index: int = 0
    """Which CPU ``auto`` takes, so that several processes on one host take one each
    (``BALANCER_CPU_INDEX``; ``hashctl up --balancers N`` sets it)."""
    server: str = "sync"
    """The public listener's gRPC server: ``sync`` — grpcio's synchronous server, each call
    handed to the asyncio core (``balancer.sync_server``; ~0.65x grpc.aio's inbound CPU per
    call), or ``aio`` — grpc.aio's (``BALANCER_SERVER``). The admin listener is grpc.aio's."""
    event_loop: str = "auto"
    """``auto`` (uvloop when installed), ``uvloop`` or ``asyncio`` (``BALANCER_EVENT_LOOP``)."""
    stats_window: int = 1024
    """Latencies kept per replica for p50/p99 (``BALANCER_STATS_WINDOW``)."""
    metrics_port: int | None = None
    """Prometheus ``/metrics`` port, served on the host of ``listen``; 0 picks a free one;
    ``None`` serves no endpoint and records no per-call metrics (``BALANCER_METRICS_PORT``,
    ``--metrics-port``)."""
    tls: ServerTls | None = None
    """TLS of both listeners, public and admin (``TLS_CERT_FILE``, ``TLS_KEY_FILE``, and
    ``TLS_CLIENT_CA_FILE`` for mutual TLS; ``--tls-cert``, ``--tls-key``, ``--tls-client-ca``)."""
    upstream_tls: ClientTls | None = None
    """TLS of the channels to the replicas, health checks included; ``None``: plaintext
    (``BALANCER_UPSTREAM_TLS_CA_FILE``, ``BALANCER_UPSTREAM_TLS_CLIENT_CERT_FILE``,
    ``BALANCER_UPSTREAM_TLS_CLIENT_KEY_FILE``, ``BALANCER_UPSTREAM_TLS_SERVER_NAME``; flags
    ``--upstream-tls-ca``, ``--upstream-tls-cert``, ``--upstream-tls-key``,
    ``--upstream-tls-server-name``). Not the shared ``TLS_CA_FILE`` family: in a balancer's
    container those describe how to reach the balancer itself (its health probe)."""

    def __post_init__(self) -> None:
        if not is_hash_key(self.hash_key):
            raise SettingsError(
                "HASHMESH_BALANCER_HASH_KEY must be a text metadata key: a-z, 0-9, '-', '_', '.' "
                "(not -bin, grpc-)"
            )
        if self.strategy not in STRATEGIES:
            raise SettingsError(f"HASHMESH_BALANCER_STRATEGY must be one of {STRATEGIES}")
        if self.ratelimit_headers not in RATELIMIT_HEADERS:
            raise SettingsError("HASHMESH_BALANCER_RATELIMIT_HEADERS must be near or always")
        if self.cpu_index < 0:
            raise SettingsError("HASHMESH_BALANCER_CPU_INDEX must be >= 0")
        if self.server not in ("sync", "aio"):
            raise SettingsError("HASHMESH_BALANCER_SERVER must be sync or aio")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise SettingsError("HASHMESH_BALANCER_EVENT_LOOP must be auto, uvloop or asyncio")
        try:
            parse_networks(self.trusted_proxies, "HASHMESH_BALANCER_TRUSTED_PROXIES")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if self.identity_secret and len(self.identity_secret) < MIN_SECRET_LENGTH:
            raise SettingsError(
                f"HASHMESH_IDENTITY_SECRET must be at least {MIN_SECRET_LENGTH} characters"
            )
        if not self.admin_token and not is_loopback(self.admin_listen):
            raise SettingsError(
                "the admin listener is not loopback: set HASHMESH_ADMIN_TOKEN or bind it to 127.0.0.1"
            )
        if self.max_streams_per_backend < 1 or self.attempt_timeout < 0:
            raise SettingsError(
                "BALANCER_MAX_STREAMS_PER_BACKEND must be >= 1, BALANCER_ATTEMPT_TIMEOUT >= 0"
            )
        if self.max_in_flight_per_backend < 1 or self.max_attempts < 1 or self.eject_after < 1:
            raise SettingsError("BALANCER_MAX_IN_FLIGHT, MAX_ATTEMPTS and EJECT_AFTER must be >= 1")
        if not 0 <= self.retry_budget_ratio <= 1:
            raise SettingsError("HASHMESH_BALANCER_RETRY_RATIO must be between 0 and 1")
        if self.health_interval <= 0 or self.dns_interval <= 0 or self.health_timeout <= 0:
            raise SettingsError("health and DNS intervals must be positive")
        if self.redis_timeout <= 0 or not 0 <= self.redis_lease_seconds <= 1:
            raise SettingsError(
                "HASHMESH_BALANCER_REDIS_TIMEOUT must be positive and "
                "HASHMESH_BALANCER_REDIS_LEASE between 0 and 1 s"
            )
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                "HASHMESH_BALANCER_REDIS_URL must start with redis://, rediss:// or unix://"
            )
        if self.limiter_table_size < 1 or self.stats_window < 16:
            raise SettingsError("LIMITER_TABLE_SIZE must be >= 1 and STATS_WINDOW >= 16")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SettingsError("HASHMESH_BALANCER_METRICS_PORT must be between 0 and 65535")
        for entry in self.backends_dns:
            if ":" not in entry:
                raise SettingsError(f"--backends-dns entry {entry!r} must be name:port")
        for entry in self.backends:
            # A typo here would otherwise start a balancer with a replica it can never reach.
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise SettingsError(f"--backends entry {entry!r} must be host:port (port 1-65535)")

    @classmethod
    def from_env(cls) -> BalancerSettings:
        limit = env_optional("BALANCER_RATE_LIMIT")
        metrics = env_optional("BALANCER_METRICS_PORT")
        return cls(
            listen=env_str("BALANCER_LISTEN", cls.listen),
            reuse_port=env_bool("BALANCER_REUSE_PORT", cls.reuse_port),
            admin_listen=env_str("BALANCER_ADMIN_LISTEN", cls.admin_listen),
            admin_token=env_str("ADMIN_TOKEN", ""),
            backends=env_list("BALANCER_BACKENDS"),
            backends_dns=env_list("BALANCER_BACKENDS_DNS"),
            dns_interval=env_float("BALANCER_DNS_INTERVAL", cls.dns_interval),
            strategy=env_str("BALANCER_STRATEGY", cls.strategy),
            hash_key=env_str("BALANCER_HASH_KEY", cls.hash_key).lower(),
            health_interval=env_float("BALANCER_HEALTH_INTERVAL", cls.health_interval),
            health_timeout=env_float("BALANCER_HEALTH_TIMEOUT", cls.health_timeout),
            eject_after=env_int("BALANCER_EJECT_AFTER", cls.eject_after, minimum=1),
            max_in_flight_per_backend=env_int(
                "BALANCER_MAX_IN_FLIGHT", cls.max_in_flight_per_backend
            ),
            max_streams_per_backend=env_int(
                "BALANCER_MAX_STREAMS_PER_BACKEND", cls.max_streams_per_backend
            ),
            attempt_timeout=env_float("BALANCER_ATTEMPT_TIMEOUT", cls.attempt_timeout, minimum=0.0),
            state_file=env_str("BALANCER_STATE_FILE", ""),
            budgets=BudgetSettings.from_env(),
            connections=ConnectionSettings.from_env(),
            idempotent_methods=env_list("BALANCER_IDEMPOTENT_METHODS", DEFAULT_IDEMPOTENT),
            retry_budget_ratio=env_float("BALANCER_RETRY_RATIO", cls.retry_budget_ratio),
            retry_budget_min=env_float("BALANCER_RETRY_MIN", cls.retry_budget_min, minimum=0),
            max_attempts=env_int("BALANCER_MAX_ATTEMPTS", cls.max_attempts, minimum=1),
            rate_limit=parse_limit(limit) if limit else None,
            rate_limit_overrides=parse_overrides(env_list("BALANCER_RATE_LIMIT_OVERRIDES")),
            ratelimit_headers=env_str("BALANCER_RATELIMIT_HEADERS", cls.ratelimit_headers).lower(),
            trusted_proxies=env_list("BALANCER_TRUSTED_PROXIES"),
            identity_secret=env_str("IDENTITY_SECRET", ""),
            limiter_table_size=env_int("BALANCER_LIMITER_TABLE_SIZE", cls.limiter_table_size),
            redis_url=env_str("BALANCER_REDIS_URL", ""),
            redis_timeout=env_float("BALANCER_REDIS_TIMEOUT", cls.redis_timeout),
            redis_lease_seconds=env_float("BALANCER_REDIS_LEASE", cls.redis_lease_seconds),
            tunnel=env_bool("BALANCER_TUNNEL", cls.tunnel),
            tunnel_socket=env_bool("BALANCER_TUNNEL_SOCKET", cls.tunnel_socket),
            api_keys_file=env_str("BALANCER_API_KEYS_FILE", ""),
            max_message_bytes=env_int("MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=1024),
            grace_seconds=env_float("GRACE_SECONDS", cls.grace_seconds, minimum=0.0),
            server=env_str("BALANCER_SERVER", cls.server).lower(),
            cpus=parse_cpus(env_str("BALANCER_CPUS", "auto")),
            cpu_index=env_int("BALANCER_CPU_INDEX", cls.cpu_index, minimum=0),
            event_loop=env_str("BALANCER_EVENT_LOOP", cls.event_loop),
            stats_window=env_int("BALANCER_STATS_WINDOW", cls.stats_window, minimum=16),
            metrics_port=env_int("BALANCER_METRICS_PORT", 0, minimum=0) if metrics else None,
            tls=ServerTls.from_env(),
            upstream_tls=upstream_tls(
                env_optional(UPSTREAM_TLS_ENV["ca"]),
                env_optional(UPSTREAM_TLS_ENV["cert"]),
                env_optional(UPSTREAM_TLS_ENV["key"]),
                env_optional(UPSTREAM_TLS_ENV["server_name"]),
            ),
        )

    @property
    def wire_message_bytes(self) -> int:
        """Largest message passed through: twice the limit, as hashd receives, so an input
        just over the limit reaches hashd and gets its INPUT_TOO_LARGE answer."""
        return 2 * self.max_message_bytes

    def with_overrides(self, **changes: Any) -> BalancerSettings:
        """Apply command-line flags; ``None`` values leave a setting as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_tls_files(
        self, cert: str | None, key: str | None, client_ca: str | None
    ) -> BalancerSettings:
        """Apply ``--tls-cert/--tls-key/--tls-client-ca``: each flag replaces its variable."""
        return replace(self, tls=ServerTls.with_flags(self.tls, cert, key, client_ca))

    def with_upstream_tls(
        self, ca: str | None, cert: str | None, key: str | None, server_name: str | None
    ) -> BalancerSettings:
        """Apply ``--upstream-tls-*``: each flag replaces its variable."""
        if ca is None and cert is None and key is None and server_name is None:
            return self
        current = self.upstream_tls or ClientTls()
        return replace(
            self,
            upstream_tls=upstream_tls(
                ca or current.ca_file,
                cert or current.cert_file,
                key or current.key_file,
                server_name or current.server_name,
            ),
        )


# The balancer's own names for its caller side (see ``BalancerSettings.upstream_tls``).
UPSTREAM_TLS_ENV = {
    "ca": "BALANCER_UPSTREAM_TLS_CA_FILE",
    "cert": "BALANCER_UPSTREAM_TLS_CLIENT_CERT_FILE",
    "key": "BALANCER_UPSTREAM_TLS_CLIENT_KEY_FILE",
    "server_name": "BALANCER_UPSTREAM_TLS_SERVER_NAME",
}


def upstream_tls(
    ca: str | None, cert: str | None, key: str | None, server_name: str | None
) -> ClientTls | None:
    """A ``ClientTls`` for the replicas, ``None`` when nothing is set (plaintext)."""
    if ca is None and cert is None and key is None and server_name is None:
        return None
    if (cert is None) != (key is None):
        raise SettingsError(
            f"HASHMESH_{UPSTREAM_TLS_ENV['cert']} and HASHMESH_{UPSTREAM_TLS_ENV['key']} "
            "(--upstream-tls-cert, --upstream-tls-key) go together"
        )
    return ClientTls(ca_file=ca, cert_file=cert, key_file=key, server_name=server_name)


def upstream_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """Channel credentials for the replicas, read once at start; a file that cannot be read
    fails start-up naming the balancer's variable, not the shared one ``ClientTls`` names."""
    try:
        return tls.credentials()
    except SettingsError as exc:
        raise SettingsError(
            str(exc).replace("HASHMESH_TLS_", "HASHMESH_BALANCER_UPSTREAM_TLS_")
        ) from exc


def parse_limit(spec: str) -> RateLimitSettings:
    """``rate[/burst]``, e.g. ``100/200``."""
    rate, _, burst = spec.partition("/")
    try:
        return RateLimitSettings(float(rate), int(burst or 0))
    except ValueError as exc:
        raise SettingsError(f"rate limit {spec!r} is not rate[/burst]: {exc}") from exc

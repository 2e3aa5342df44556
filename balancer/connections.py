"""Connection limits of the balancer's two listeners, as gRPC server options.

gRPC enforces them itself: at most ``max_connections`` connections are accepted (more are
closed at once), a connection with no call for ``idle_seconds`` gets GOAWAY, every connection
is recycled after ``age_seconds`` (calls in flight get ``age_grace_seconds`` more), a peer that
pings more often than every ``MIN_PING_INTERVAL_MS`` without data is disconnected, a handshake
must finish within ``HANDSHAKE_TIMEOUT_MS``, and one connection carries at most
``streams_per_connection`` calls at once. The admin listener has its own, smaller, fixed
limits: a flood of the public port cannot use them up. Both listeners share the process's
file descriptors, so ``raise_fd_limit`` lifts the soft limit to the hard one and
``max_connections`` is kept below it with room for the admin listener and the replicas."""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, replace
from typing import Any

from hashmesh.core.settings import SettingsError, env_float, env_int

log = logging.getLogger(__name__)

MIN_PING_INTERVAL_MS = 5_000
HANDSHAKE_TIMEOUT_MS = 10_000
ADMIN_MAX_CONNECTIONS = 64
ADMIN_STREAMS_PER_CONNECTION = 32
ADMIN_IDLE_SECONDS = 300.0
FD_RESERVE = 256
"""Descriptors kept free for the admin listener, replica channels, DNS and logs."""


@dataclass(frozen=True)
class ConnectionSettings:
    """Limits of the public listener (environment variables with the ``HASHMESH_`` prefix)."""

    max_connections: int = 10_000
    """Connections open at once on the public listener; lowered at start to fit the file
    descriptor limit (``BALANCER_MAX_CONNECTIONS``)."""
    idle_seconds: float = 60.0
    """A connection with no call in flight for this long is closed (``BALANCER_CONNECTION_IDLE_SECONDS``)."""
    age_seconds: float = 3600.0
    """Longest life of a connection; clients reconnect (``BALANCER_CONNECTION_AGE_SECONDS``)."""
    age_grace_seconds: float = 300.0
    """Time calls in flight get to finish on a connection past its age (``BALANCER_CONNECTION_AGE_GRACE_SECONDS``)."""
    streams_per_connection: int = 512
    """Calls at once on one connection (HTTP/2 MAX_CONCURRENT_STREAMS, ``BALANCER_STREAMS_PER_CONNECTION``)."""

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.streams_per_connection < 1:
            raise SettingsError(
                "HASHMESH_BALANCER_MAX_CONNECTIONS and _STREAMS_PER_CONNECTION must be >= 1"
            )
        if min(self.idle_seconds, self.age_seconds, self.age_grace_seconds) <= 0:
            raise SettingsError("HASHMESH_BALANCER_CONNECTION_* durations must be positive")

    @classmethod
    def from_env(cls) -> ConnectionSettings:
        d = cls()
        return cls(
            max_connections=env_int("BALANCER_MAX_CONNECTIONS", d.max_connections),
            idle_seconds=env_float("BALANCER_CONNECTION_IDLE_SECONDS", d.idle_seconds),
            age_seconds=env_float("BALANCER_CONNECTION_AGE_SECONDS", d.age_seconds),
            age_grace_seconds=env_float(
                "BALANCER_CONNECTION_AGE_GRACE_SECONDS", d.age_grace_seconds
            ),
            streams_per_connection=env_int(
                "BALANCER_STREAMS_PER_CONNECTION", d.streams_per_connection
            ),
        )

    def fitted(self, fd_limit: int) -> ConnectionSettings:
        """These limits with ``max_connections`` lowered to what ``fd_limit`` descriptors allow."""
        room = max(1, fd_limit - FD_RESERVE - ADMIN_MAX_CONNECTIONS)
        if self.max_connections <= room:
            return self
        log.warning(
            "fewer connections than asked: file descriptor limit",
            extra={"asked": self.max_connections, "allowed": room, "fd_limit": fd_limit},
        )
        return replace(self, max_connections=room)


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file descriptor limit", extra={"error": str(exc)})
    return soft


def _common(max_connections: int, streams: int, idle_seconds: float) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_concurrent_streams", streams),
        ("grpc.max_connection_idle_ms", int(idle_seconds * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ]


def public_options(settings: ConnectionSettings) -> list[tuple[str, Any]]:
    return [
        *_common(settings.max_connections, settings.streams_per_connection, settings.idle_seconds),
        ("grpc.max_connection_age_ms", int(settings.age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.age_grace_seconds * 1000)),
    ]


def admin_options() -> list[tuple[str, Any]]:
    return _common(ADMIN_MAX_CONNECTIONS, ADMIN_STREAMS_PER_CONNECTION, ADMIN_IDLE_SECONDS)

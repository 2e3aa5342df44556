"""Settings of one workerd process: ``WorkerSettings.from_env()`` then command-line flags."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from typing import Any

from hashmesh.core import resources
from hashmesh.core.queue.retention import RetentionPolicy
from hashmesh.core.queue.sealing import TaskKeyring
from hashmesh.core.settings import (
    DatabaseSettings,
    SettingsError,
    env_float,
    env_int,
    env_list,
    env_optional,
)


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one workerd needs. Field docstrings name the environment variable."""

    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    """PostgreSQL access (``HASHMESH_DATABASE_URL``, ``HASHMESH_DB_*``)."""
    name: str = field(default_factory=default_name)
    """Unique worker name, shown in queue statistics (``HASHMESH_WORKERD_NAME``; default
    ``<host>-<pid>``)."""
    concurrency: int = 128
    """Most tasks held at once: claimed and not yet written back. Claims never ask for more
    than the free slots (bounded prefetch) (``HASHMESH_WORKERD_CONCURRENCY``)."""
    cpu_workers: int = field(default_factory=lambda: resources.detect().cpu_threads)
    """Threads running argon2 tasks; digests run inline (``HASHMESH_WORKERD_CPU_WORKERS``);
    default: the cgroup's CPU limit rounded up, else the CPUs this process may run on."""
    lease_seconds: float = 30.0
    """Lease of a claimed task; a task whose lease expires is put back and retried
    (``HASHMESH_TASK_LEASE_SECONDS``)."""
    reap_seconds: float = 1.0
    """How often this worker looks for tasks of dead workers (session gone) or expired leases
    and puts them back; one worker at a time does the work (``HASHMESH_WORKERD_REAP_SECONDS``)."""
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    """How long finished tasks are kept, and the pruner's pace (``HASHMESH_RETENTION_*``)."""
    heartbeat_seconds: float = 5.0
    """Interval between lease renewals and liveness updates; must be well under the lease
    (``HASHMESH_WORKERD_HEARTBEAT_SECONDS``)."""
    poll_seconds: float = 5.0
    """Safety poll: claims are tried this often even without a NOTIFY wake-up
    (``HASHMESH_WORKERD_POLL_SECONDS``)."""
    retry_base: float = 1.0
    """Backoff before the 2nd attempt, doubled per attempt, with jitter
    (``HASHMESH_TASK_RETRY_BASE``)."""
    retry_cap: float = 300.0
    """Largest backoff between attempts (``HASHMESH_TASK_RETRY_CAP``)."""
    grace_seconds: float = 10.0
    """On SIGTERM, seconds in-flight tasks get to finish before the rest is handed back
    (``HASHMESH_GRACE_SECONDS``)."""
    fail_algorithms: tuple[str, ...] = ()
    """Fault injection for tests only: every attempt of a task with one of these algorithms
    fails (``HASHMESH_WORKERD_FAIL_ALGORITHMS``, comma-separated). Empty in production."""
    metrics_port: int | None = None
    """Port of the Prometheus /metrics endpoint; 0 picks a free one, unset turns it off
    (``HASHMESH_WORKERD_METRICS_PORT``)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds to. workerd has no gRPC listener to borrow a host
    from, so it stays local unless set: ``0.0.0.0`` in containers, where Prometheus and the
    probes reach it from outside (``HASHMESH_WORKERD_METRICS_HOST``)."""

    task_keys: TaskKeyring | None = None
    """Keys that open sealed task inputs (``HASHMESH_TASK_KEY_FILE`` or ``HASHMESH_TASK_KEYS``):
    the same ring as hashd's, or a superset during a rotation. ``None``: a sealed input fails
    its attempt with a message naming the key id."""

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200:
            raise SettingsError("HASHMESH_WORKERD_NAME must be 1 to 200 characters")
        if self.concurrency < 1:
            raise SettingsError("HASHMESH_WORKERD_CONCURRENCY must be >= 1")
        if self.cpu_workers < 1:
            raise SettingsError("HASHMESH_WORKERD_CPU_WORKERS must be >= 1")
        if not 0 < self.heartbeat_seconds < self.lease_seconds:
            raise SettingsError(
                "need 0 < HASHMESH_WORKERD_HEARTBEAT_SECONDS < HASHMESH_TASK_LEASE_SECONDS"
            )
        if self.reap_seconds <= 0:
            raise SettingsError("HASHMESH_WORKERD_REAP_SECONDS must be positive")
        if self.poll_seconds <= 0:
            raise SettingsError("HASHMESH_WORKERD_POLL_SECONDS must be positive")
        if self.retry_base < 0 or self.retry_cap < self.retry_base:
            raise SettingsError("need 0 <= HASHMESH_TASK_RETRY_BASE <= HASHMESH_TASK_RETRY_CAP")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SettingsError("HASHMESH_WORKERD_METRICS_PORT must be a port (0 picks a free one)")
        if not self.metrics_host.strip():
            raise SettingsError("HASHMESH_WORKERD_METRICS_HOST must not be empty")

    @classmethod
    def from_env(cls) -> WorkerSettings:
        metrics = env_optional("WORKERD_METRICS_PORT")
        return cls(
            database=DatabaseSettings.from_env(),
            name=env_optional("WORKERD_NAME") or default_name(),
            concurrency=env_int("WORKERD_CONCURRENCY", cls.concurrency, minimum=1),
            cpu_workers=env_int("WORKERD_CPU_WORKERS", resources.detect().cpu_threads, minimum=1),
            lease_seconds=env_float("TASK_LEASE_SECONDS", cls.lease_seconds, minimum=0.1),
            heartbeat_seconds=env_float(
                "WORKERD_HEARTBEAT_SECONDS", cls.heartbeat_seconds, minimum=0.05
            ),
            poll_seconds=env_float("WORKERD_POLL_SECONDS", cls.poll_seconds, minimum=0.01),
            reap_seconds=env_float("WORKERD_REAP_SECONDS", cls.reap_seconds, minimum=0.01),
            retention=RetentionPolicy.from_env(),
            retry_base=env_float("TASK_RETRY_BASE", cls.retry_base, minimum=0.0),
            retry_cap=env_float("TASK_RETRY_CAP", cls.retry_cap, minimum=0.0),
            grace_seconds=env_float("GRACE_SECONDS", cls.grace_seconds, minimum=0.0),
            fail_algorithms=env_list("WORKERD_FAIL_ALGORITHMS"),
            metrics_port=env_int("WORKERD_METRICS_PORT", 0, minimum=0) if metrics else None,
            metrics_host=env_optional("WORKERD_METRICS_HOST") or cls.metrics_host,
            task_keys=TaskKeyring.from_env(),
        )

    def with_overrides(self, **changes: Any) -> WorkerSettings:
        """Apply command-line flags; ``None`` values leave a setting as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

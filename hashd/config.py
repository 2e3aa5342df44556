"""Settings of one hashd replica: ``HashdSettings.from_env()`` then command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from hashmesh.core import resources
from hashmesh.core.hashing.algorithms import BOUNDS
from hashmesh.core.hashing.cache import CacheSettings
from hashmesh.core.identity import MIN_SECRET_LENGTH
from hashmesh.core.queue.sealing import TaskKeyring
from hashmesh.core.settings import (
    DatabaseSettings,
    SettingsError,
    env_float,
    env_int,
    env_list,
    env_optional,
    env_str,
)
from hashmesh.core.tls import ServerTls


@dataclass(frozen=True)
class HashdSettings:
    """Everything one hashd process needs. Field docstrings name the environment variable."""

    listen: str = "127.0.0.1:50051"
    """host:port to serve on; port 0 picks a free one (``HASHMESH_HASHD_LISTEN``)."""
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    """PostgreSQL access (``HASHMESH_DATABASE_URL``, ``HASHMESH_DB_*``)."""
    grace_seconds: float = 10.0
    """On SIGTERM, seconds in-flight calls get to finish (``HASHMESH_GRACE_SECONDS``)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest unary input; larger inputs must use HashStream (``HASHMESH_MAX_MESSAGE_BYTES``).
    The gRPC receive limit is set to twice this, so that a caller slightly over it gets a
    status telling it to stream; beyond twice, gRPC itself refuses with RESOURCE_EXHAUSTED."""
    resources: resources.Resources = field(default_factory=resources.detect)
    """CPUs and memory this replica may use: its cgroup's limits (a container's), else the
    host's. The two settings below default from it."""
    cpu_workers: int = field(default_factory=lambda: resources.detect().cpu_threads)
    """Threads for CPU-heavy work such as argon2 (``HASHMESH_HASHD_CPU_WORKERS``); default:
    the cgroup's CPU limit rounded up, else the CPUs this process may run on."""
    argon2_max_memory_kib: int | None = None
    """Largest argon2 ``memory_cost_kib`` accepted (``HASHMESH_HASHD_ARGON2_MAX_MEMORY_KIB``);
    default (``None``): what lets ``cpu_workers`` such calls run at once within the memory
    limit, beside the process itself, at most the protocol's 256 MiB. Larger requests get
    INVALID_ARGUMENT naming ``memory_cost_kib``, never an out-of-memory kill."""
    cpu_queue: int = 32
    """Calls that may wait for a CPU thread before new ones are refused with RESOURCE_EXHAUSTED
    (``HASHMESH_HASHD_CPU_QUEUE``)."""
    cache: CacheSettings = field(default_factory=CacheSettings)
    """The result cache (``HASHMESH_CACHE_*``; see ``hashmesh.core.hashing.cache.CacheSettings``)."""
    max_pending_tasks: int = 1_000_000
    """Pending tasks allowed in the whole queue before submissions are refused
    (``HASHMESH_MAX_PENDING_TASKS``)."""
    max_pending_per_client: int = 100_000
    """Pending tasks allowed per client id (``HASHMESH_MAX_PENDING_PER_CLIENT``)."""
    max_pending_cost: int = 1 << 44
    """Work queued in the whole queue, in cost units (``core.tasks.limits.task_cost``: argon2id
    time_cost x memory in bytes, a digest its input's bytes, +4096 per task), 16 TiB
    (``HASHMESH_MAX_PENDING_COST``)."""
    max_pending_cost_per_client: int = 1 << 40
    """Work one client may have queued, in cost units: 1 TiB, about 5,000 default argon2id
    tasks or 400 of the costliest (``HASHMESH_MAX_PENDING_COST_PER_CLIENT``)."""
    max_priority: int = 10
    """Highest task priority a client may ask for (``HASHMESH_MAX_PRIORITY``)."""
    priority_overrides: dict[str, int] = field(default_factory=dict)
    """Highest priority per named client, e.g. ``ops=100`` (``HASHMESH_PRIORITY_OVERRIDES``
    as ``client=max,...``)."""
    default_max_attempts: int = 5
    """Attempts for a task that does not say (``HASHMESH_TASK_MAX_ATTEMPTS``)."""
    worker_alive_seconds: float = 30.0
    """A workerd whose last heartbeat is older than this is not counted as alive in queue
    statistics (``HASHMESH_WORKER_ALIVE_SECONDS``)."""
    metrics_port: int | None = None
    """Port of the Prometheus endpoint, served on the host of ``listen``; 0 picks a free one,
    unset turns it off (``HASHMESH_HASHD_METRICS_PORT``)."""
    queue_metrics_seconds: float = 20.0
    """With metrics on, seconds between reads of the queue depth by status (a sum over the
    O(1) counters; ``HASHMESH_HASHD_QUEUE_METRICS_SECONDS``)."""
    identity_secret: str = ""
    """HMAC key of the balancer's identity stamp, the same in every balancer and hashd of the
    mesh (``HASHMESH_IDENTITY_SECRET``); also keys idempotency fingerprints. The daemon refuses
    to start without it (at least 16 characters)."""
    admin_token: str = ""
    """Token of the operator identity for callers that reach this replica directly, as
    ``authorization: Bearer <token>`` (``HASHMESH_ADMIN_TOKEN``); empty: no direct caller is an
    operator (the balancer's stamp still can say so)."""
    idempotency_window_seconds: float = 86_400.0
    """How long an idempotency key is remembered after its task was created; a key older than
    this starts a new task (``HASHMESH_IDEMPOTENCY_WINDOW_SECONDS``, default 24 h). A key also
    goes when its task is deleted."""
    tls: ServerTls | None = None
    """TLS of the listener (``HASHMESH_TLS_CERT_FILE``, ``HASHMESH_TLS_KEY_FILE``, and
    ``HASHMESH_TLS_CLIENT_CA_FILE`` for mutual TLS); ``None`` serves plaintext."""
    task_keys: TaskKeyring | None = None
    """Keys that seal every task input before it is stored (``HASHMESH_TASK_KEY_FILE`` or
    ``HASHMESH_TASK_KEYS``). ``None``: digest inputs are stored as given and argon2 tasks are
    refused with FAILED_PRECONDITION, since their input is a password."""

    def __post_init__(self) -> None:
        if self.cpu_workers < 1:
            raise SettingsError("HASHMESH_HASHD_CPU_WORKERS must be >= 1")
        low, high = BOUNDS["memory_cost_kib"]
        derived = self.resources.argon2_memory_kib(self.cpu_workers, high)
        if self.argon2_max_memory_kib is None and derived < low:
            raise SettingsError(
                f"a memory limit of {self.resources.memory_bytes // 2**20} MiB cannot hold "
                f"{self.cpu_workers} argon2 calls of {low // 1024} MiB at once: raise the limit or "
                "lower HASHMESH_HASHD_CPU_WORKERS"
            )
        explicit = self.argon2_max_memory_kib
        if explicit is not None and not low <= explicit <= high:
            raise SettingsError(
                f"HASHMESH_HASHD_ARGON2_MAX_MEMORY_KIB must be between {low} and {high}"
            )
        if explicit is not None and explicit > self.resources.argon2_memory_kib(
            self.cpu_workers, explicit
        ):
            raise SettingsError(
                f"HASHMESH_HASHD_ARGON2_MAX_MEMORY_KIB={explicit} x HASHMESH_HASHD_CPU_WORKERS="
                f"{self.cpu_workers} does not fit the memory limit of "
                f"{self.resources.memory_bytes // 2**20} MiB (at most {derived} KiB fits)"
            )
        if self.cpu_queue < 0:
            raise SettingsError("HASHMESH_HASHD_CPU_QUEUE must be >= 0")
        if self.max_message_bytes < 1024:
            raise SettingsError("HASHMESH_MAX_MESSAGE_BYTES must be >= 1024")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SettingsError("HASHMESH_HASHD_METRICS_PORT must be a port (0 picks a free one)")
        if not -100 <= self.max_priority <= 100 or any(
            not -100 <= cap <= 100 for cap in self.priority_overrides.values()
        ):
            raise SettingsError("HASHMESH_MAX_PRIORITY and HASHMESH_PRIORITY_OVERRIDES: -100..100")
        if self.identity_secret and len(self.identity_secret) < MIN_SECRET_LENGTH:
            raise SettingsError(
                f"HASHMESH_IDENTITY_SECRET must be at least {MIN_SECRET_LENGTH} characters"
            )
        if self.idempotency_window_seconds <= 0:
            raise SettingsError("HASHMESH_IDEMPOTENCY_WINDOW_SECONDS must be positive")
        if self.queue_metrics_seconds <= 0:
            raise SettingsError("HASHMESH_HASHD_QUEUE_METRICS_SECONDS must be positive")

    @cached_property
    def argon2_memory_limit_kib(self) -> int:
        """The largest argon2 ``memory_cost_kib`` this replica accepts (worked out once: every
        submission asks)."""
        if self.argon2_max_memory_kib is not None:
            return self.argon2_max_memory_kib
        return self.resources.argon2_memory_kib(self.cpu_workers, BOUNDS["memory_cost_kib"][1])

    @classmethod
    def from_env(cls) -> HashdSettings:
        metrics = env_optional("HASHD_METRICS_PORT")
        found = resources.detect()
        argon2_memory = env_optional("HASHD_ARGON2_MAX_MEMORY_KIB")
        return cls(
            listen=env_str("HASHD_LISTEN", cls.listen),
            database=DatabaseSettings.from_env(),
            grace_seconds=env_float("GRACE_SECONDS", cls.grace_seconds, minimum=0.0),
            max_message_bytes=env_int("MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=1024),
            resources=found,
            cpu_workers=env_int("HASHD_CPU_WORKERS", found.cpu_threads, minimum=1),
            argon2_max_memory_kib=(
                env_int("HASHD_ARGON2_MAX_MEMORY_KIB", 0, minimum=1) if argon2_memory else None
            ),
            cpu_queue=env_int("HASHD_CPU_QUEUE", cls.cpu_queue, minimum=0),
            cache=CacheSettings.from_env(),
            max_pending_tasks=env_int("MAX_PENDING_TASKS", cls.max_pending_tasks, minimum=1),
            max_pending_per_client=env_int(
                "MAX_PENDING_PER_CLIENT", cls.max_pending_per_client, minimum=1
            ),
            max_pending_cost=env_int("MAX_PENDING_COST", cls.max_pending_cost, minimum=1),
            max_pending_cost_per_client=env_int(
                "MAX_PENDING_COST_PER_CLIENT", cls.max_pending_cost_per_client, minimum=1
            ),
            max_priority=env_int("MAX_PRIORITY", cls.max_priority),
            priority_overrides=parse_priority_overrides(env_list("PRIORITY_OVERRIDES")),
            default_max_attempts=env_int("TASK_MAX_ATTEMPTS", cls.default_max_attempts, minimum=1),
            worker_alive_seconds=env_float(
                "WORKER_ALIVE_SECONDS", cls.worker_alive_seconds, minimum=0.1
            ),
            metrics_port=env_int("HASHD_METRICS_PORT", 0, minimum=0) if metrics else None,
            queue_metrics_seconds=env_float(
                "HASHD_QUEUE_METRICS_SECONDS", cls.queue_metrics_seconds, minimum=0.1
            ),
            identity_secret=env_str("IDENTITY_SECRET", ""),
            admin_token=env_str("ADMIN_TOKEN", ""),
            idempotency_window_seconds=env_float(
                "IDEMPOTENCY_WINDOW_SECONDS", cls.idempotency_window_seconds, minimum=1.0
            ),
            tls=ServerTls.from_env(),
            task_keys=TaskKeyring.from_env(),
        )

    def with_overrides(self, **changes: Any) -> HashdSettings:
        """Apply command-line flags; ``None`` values leave a setting as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_tls_files(
        self, cert: str | None, key: str | None, client_ca: str | None
    ) -> HashdSettings:
        """Apply ``--tls-cert/--tls-key/--tls-client-ca``: each flag replaces its variable."""
        return replace(self, tls=ServerTls.with_flags(self.tls, cert, key, client_ca))


def parse_priority_overrides(items: tuple[str, ...]) -> dict[str, int]:
    """``client=max`` items, e.g. ``ops=100``."""
    caps: dict[str, int] = {}
    for item in items:
        client, sep, cap = item.partition("=")
        try:
            if not sep or not client:
                raise ValueError
            caps[client] = int(cap)
        except ValueError:
            raise SettingsError(
                f"HASHMESH_PRIORITY_OVERRIDES item {item!r} is not client=max_priority"
            ) from None
    return caps

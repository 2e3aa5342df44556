"""The options every hashctl command shares, resolved once by the app's callback."""

from __future__ import annotations

from dataclasses import dataclass

from hashmesh.core.tls import ClientTls

DEFAULT_TARGET = "127.0.0.1:50050"
DEFAULT_ADMIN_TARGET = "127.0.0.1:50060"


@dataclass(frozen=True)
class CliOptions:
    """Global options of one hashctl invocation (flags, else ``HASHMESH_*`` variables)."""

    target: str = DEFAULT_TARGET
    """Address of the public endpoint: the balancer, or one hashd (``HASHMESH_TARGET``)."""
    admin_target: str = DEFAULT_ADMIN_TARGET
    """Address of the balancer's AdminService listener (``HASHMESH_ADMIN_TARGET``)."""
    admin_token: str | None = None
    """The operator's token (``HASHMESH_ADMIN_TOKEN``), sent as ``authorization: Bearer`` to
    AdminService and with every other call, which then acts as the operator (every tenant's
    tasks, ``cache clear``, worker details); unset sends none."""
    api_key: str | None = None
    """Sent as ``x-api-key`` on calls to the public endpoint (``HASHMESH_API_KEY``)."""
    timeout: float = 10.0
    """Deadline of each call, in seconds (``HASHMESH_TIMEOUT``)."""
    client_id: str | None = None
    """Sent as ``x-client-id`` metadata (``HASHMESH_CLIENT_ID``); the mesh believes it only
    from a proxy in ``HASHMESH_BALANCER_TRUSTED_PROXIES``, never from hashctl itself."""
    json: bool = False
    """Print machine-readable JSON instead of tables."""
    tls: ClientTls | None = None
    """TLS of every channel hashctl opens (``--tls-ca``, ``--tls-cert``, ``--tls-key``,
    ``--tls-server-name``, else ``HASHMESH_TLS_CA_FILE``, ``HASHMESH_TLS_CLIENT_CERT_FILE``,
    ``HASHMESH_TLS_CLIENT_KEY_FILE``, ``HASHMESH_TLS_SERVER_NAME``); ``None``: plaintext.
    ``hashmesh.cli.client.channel_security`` is the one place that turns it into credentials."""

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("--timeout must be positive")

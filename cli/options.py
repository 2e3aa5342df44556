"""The options hashctl commands share: the global ones (``CliOptions``, resolved once by the
app's callback) and the flags several commands take (``--json``, argon2id's parameters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from hashmesh.core.tls import ClientTls
from hashmesh.v1 import common_pb2

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


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
TimeCost = Annotated[
    int, typer.Option(help="argon2id: passes over memory (0 = server default).", min=0)
]
MemoryCost = Annotated[
    int, typer.Option(help="argon2id: memory in KiB (0 = server default).", min=0)
]
Parallelism = Annotated[int, typer.Option(help="argon2id: lanes (0 = server default).", min=0)]
HashLen = Annotated[int, typer.Option(help="argon2id: raw hash bytes (0 = server default).", min=0)]
Salt = Annotated[
    str | None,
    typer.Option(help="argon2id: salt (UTF-8 text, >= 8 bytes); makes the result deterministic."),
]


def argon2_params(
    time_cost: int, memory_cost: int, parallelism: int, hash_len: int, salt: str | None
) -> common_pb2.Argon2Params:
    return common_pb2.Argon2Params(
        time_cost=time_cost,
        memory_cost_kib=memory_cost,
        parallelism=parallelism,
        hash_len=hash_len,
        salt=salt.encode() if salt else b"",
    )

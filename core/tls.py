"""TLS for hashmesh's gRPC links, from certificate paths in settings.

Two sides, each optional:
- ``ServerTls`` — a daemon's listener (hashd, the balancer): certificate + key, and a client
  CA which, when set, turns on mutual TLS (every caller must present a certificate it signed).
- ``ClientTls`` — a caller (balancer → replicas, hashctl / bench → balancer): the CA that signed
  the server, and a client certificate + key for mutual TLS.

Environment (one process plays each side at most once, so the names are shared):
``HASHMESH_TLS_CERT_FILE``, ``HASHMESH_TLS_KEY_FILE``, ``HASHMESH_TLS_CLIENT_CA_FILE`` (server);
``HASHMESH_TLS_CA_FILE``, ``HASHMESH_TLS_CLIENT_CERT_FILE``, ``HASHMESH_TLS_CLIENT_KEY_FILE``,
``HASHMESH_TLS_SERVER_NAME`` (client).

Server certificates are re-read when their files change (``grpc.dynamic_ssl_server_credentials``),
so rotating them needs no restart: new handshakes use the new files, open connections go on."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hashmesh.core.settings import SettingsError, env_optional

log = logging.getLogger(__name__)


def _read(path: str, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{variable}: cannot read {path!r}: {exc.strerror}") from exc


@dataclass(frozen=True)
class ServerTls:
    """TLS for a listening daemon."""

    cert_file: str
    """PEM certificate chain the server presents (``HASHMESH_TLS_CERT_FILE``)."""
    key_file: str
    """PEM private key of that certificate (``HASHMESH_TLS_KEY_FILE``)."""
    client_ca_file: str | None = None
    """PEM CA bundle that signs client certificates (``HASHMESH_TLS_CLIENT_CA_FILE``). Set:
    mutual TLS, callers without a certificate from this CA are refused at the handshake."""

    def __post_init__(self) -> None:
        if not self.cert_file or not self.key_file:
            raise SettingsError("HASHMESH_TLS_CERT_FILE and HASHMESH_TLS_KEY_FILE go together")

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    @classmethod
    def from_env(cls) -> ServerTls | None:
        """``None`` when no server certificate is configured (plaintext listener)."""
        cert, key = env_optional("TLS_CERT_FILE"), env_optional("TLS_KEY_FILE")
        client_ca = env_optional("TLS_CLIENT_CA_FILE")
        if cert is None and key is None:
            if client_ca is not None:
                raise SettingsError(
                    "HASHMESH_TLS_CLIENT_CA_FILE needs HASHMESH_TLS_CERT_FILE and "
                    "HASHMESH_TLS_KEY_FILE"
                )
            return None
        return cls(cert_file=cert or "", key_file=key or "", client_ca_file=client_ca)

    @staticmethod
    def with_flags(
        current: ServerTls | None, cert: str | None, key: str | None, client_ca: str | None
    ) -> ServerTls | None:
        """Apply ``--tls-cert/--tls-key/--tls-client-ca`` over ``current`` (from the
        environment): each flag given replaces its variable."""
        if cert is None and key is None and client_ca is None:
            return current
        cert = cert or (current.cert_file if current else None)
        key = key or (current.key_file if current else None)
        if not cert or not key:
            raise SettingsError("--tls-cert and --tls-key go together (--tls-client-ca needs both)")
        client_ca = client_ca or (current.client_ca_file if current else None)
        return ServerTls(cert_file=cert, key_file=key, client_ca_file=client_ca)

    def _material(self) -> tuple[bytes, bytes, bytes | None]:
        key = _read(self.key_file, "HASHMESH_TLS_KEY_FILE")
        cert = _read(self.cert_file, "HASHMESH_TLS_CERT_FILE")
        roots = (
            _read(self.client_ca_file, "HASHMESH_TLS_CLIENT_CA_FILE")
            if self.client_ca_file
            else None
        )
        return key, cert, roots

    def _certificate_configuration(self) -> Any:
        key, cert, roots = self._material()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def credentials(self, *, reload: bool = True) -> grpc.ServerCredentials:
        """Server credentials (``GrpcServer(listen, tls=...)`` asks at ``start()``). Files are read now
        (a missing file fails start-up with the variable's name); with ``reload`` they are
        read again on a new handshake after any of them changed."""
        if not reload:
            key, cert, roots = self._material()
            return grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=roots, require_client_auth=self.mutual
            )
        return grpc.dynamic_ssl_server_credentials(
            self._certificate_configuration(),
            _Reloader(self),
            require_client_authentication=self.mutual,
        )


class _Reloader:
    """grpc's certificate-config fetcher: returns a new configuration when a file changed,
    ``None`` (keep the current one) otherwise. grpc calls it from its own threads."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._seen = self._stamp()

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        paths = [self._tls.cert_file, self._tls.key_file, self._tls.client_ca_file]
        stamps = []
        for path in paths:
            if path is None:
                continue
            try:
                info = os.stat(path)
                stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
            except OSError:
                stamps.append((0, -1, 0))
        return tuple(stamps)

    def __call__(self) -> Any:
        with self._lock:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            try:
                config = self._tls._certificate_configuration()
            except SettingsError:
                # Mid-rotation (a file missing or half written): keep serving the old pair.
                log.warning("TLS files changed but cannot be read yet; keeping the old ones")
                return None
            self._seen = stamp
            log.info("TLS certificates reloaded", extra={"cert_file": self._tls.cert_file})
            return config


@dataclass(frozen=True)
class ClientTls:
    """TLS for a caller."""

    ca_file: str | None = None
    """PEM CA bundle that signs the server's certificate (``HASHMESH_TLS_CA_FILE``); unset:
    the system roots."""
    cert_file: str | None = None
    """PEM client certificate for mutual TLS (``HASHMESH_TLS_CLIENT_CERT_FILE``)."""
    key_file: str | None = None
    """PEM key of the client certificate (``HASHMESH_TLS_CLIENT_KEY_FILE``)."""
    server_name: str | None = None
    """Name to check the server certificate against instead of the dialled host
    (``HASHMESH_TLS_SERVER_NAME``), e.g. when dialling replicas by IP found through DNS."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingsError(
                "HASHMESH_TLS_CLIENT_CERT_FILE and HASHMESH_TLS_CLIENT_KEY_FILE go together"
            )

    @classmethod
    def from_env(cls) -> ClientTls | None:
        """``None`` when none of the client variables is set (plaintext channels)."""
        values = {
            "ca_file": env_optional("TLS_CA_FILE"),
            "cert_file": env_optional("TLS_CLIENT_CERT_FILE"),
            "key_file": env_optional("TLS_CLIENT_KEY_FILE"),
            "server_name": env_optional("TLS_SERVER_NAME"),
        }
        if all(v is None for v in values.values()):
            return None
        return cls(**values)

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials for ``grpc.aio.secure_channel(target, creds, options=...)``."""
        roots = _read(self.ca_file, "HASHMESH_TLS_CA_FILE") if self.ca_file else None
        key = _read(self.key_file, "HASHMESH_TLS_CLIENT_KEY_FILE") if self.key_file else None
        cert = _read(self.cert_file, "HASHMESH_TLS_CLIENT_CERT_FILE") if self.cert_file else None
        return grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Options to pass with the credentials (the server-name override, when set)."""
        if self.server_name is None:
            return []
        return [
            ("grpc.ssl_target_name_override", self.server_name),
            ("grpc.default_authority", self.server_name),
        ]


@dataclass(frozen=True)
class TlsSettings:
    """Both sides, as one process reads them; either may be ``None`` (plaintext)."""

    server: ServerTls | None = None
    """The process's own listener (hashd, the balancer's client-facing port)."""
    client: ClientTls | None = None
    """The process's outgoing channels (balancer → replicas, hashctl → balancer)."""

    @classmethod
    def from_env(cls) -> TlsSettings:
        return cls(server=ServerTls.from_env(), client=ClientTls.from_env())

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return self.server.credentials() if self.server is not None else None


def secure_channel(
    target: str, tls: ClientTls | None, *, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target``: TLS when ``tls`` is given, plaintext otherwise."""
    opts = list(options or [])
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=[*opts, *tls.channel_options()]
    )

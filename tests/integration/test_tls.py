"""hashmesh.core.tls: a real grpc.aio GrpcServer serving health over TLS and mutual TLS with
certificates made at test time; callers without the right certificate are refused; server
certificates rotate without a restart."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hashmesh.core.rpc import GrpcServer
from hashmesh.core.settings import SettingsError
from hashmesh.core.tls import ClientTls, ServerTls, TlsSettings, secure_channel
from tests.certs import Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


async def check(address: str, tls: ClientTls | None) -> grpc.StatusCode:
    """Health-check ``address``; the status code of the call (OK when SERVING)."""
    async with secure_channel(address, tls) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


async def serving(tls: ServerTls) -> GrpcServer:
    server = GrpcServer("127.0.0.1:0", credentials=tls.credentials())
    await server.start()
    await server.set_serving(True)
    return server


def test_tls_server_answers_callers_that_trust_its_ca(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")

    async def scenario() -> None:
        server = await serving(ServerTls(str(pki.server_cert), str(pki.server_key)))
        try:
            assert (
                await check(server.address, ClientTls(ca_file=str(pki.ca_cert)))
                is grpc.StatusCode.OK
            )
            # Dialled by a name that differs from the address: the override names the cert.
            named = ClientTls(ca_file=str(pki.ca_cert), server_name="localhost")
            assert await check(server.address, named) is grpc.StatusCode.OK
            assert await check(server.address, None) is grpc.StatusCode.UNAVAILABLE
            untrusted = ClientTls(ca_file=str(other.ca_cert))
            assert await check(server.address, untrusted) is grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_mutual_tls_refuses_callers_without_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), client_ca_file=str(pki.ca_cert))
    assert tls.mutual

    async def scenario() -> None:
        server = await serving(tls)
        try:
            with_cert = ClientTls(
                ca_file=str(pki.ca_cert),
                cert_file=str(pki.client_cert),
                key_file=str(pki.client_key),
            )
            assert await check(server.address, with_cert) is grpc.StatusCode.OK
            without_cert = ClientTls(ca_file=str(pki.ca_cert))
            assert await check(server.address, without_cert) is grpc.StatusCode.UNAVAILABLE
            foreign_cert = ClientTls(
                ca_file=str(pki.ca_cert),
                cert_file=str(other.client_cert),
                key_file=str(other.client_key),
            )
            assert await check(server.address, foreign_cert) is grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_server_certificate_rotates_without_restart(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server-key.pem"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    rotated = make_pki(tmp_path / "rotated")

    async def scenario() -> None:
        server = await serving(ServerTls(str(cert), str(key)))
        try:
            old_trust, new_trust = (
                ClientTls(ca_file=str(pki.ca_cert)),
                ClientTls(ca_file=str(rotated.ca_cert)),
            )
            assert await check(server.address, old_trust) is grpc.StatusCode.OK
            assert await check(server.address, new_trust) is grpc.StatusCode.UNAVAILABLE
            # Rotate as an operator (or a Kubernetes secret update) would: replace by rename.
            for source, target in ((rotated.server_key, key), (rotated.server_cert, cert)):
                staged = target.with_suffix(".new")
                shutil.copy(source, staged)
                staged.replace(target)
            assert await check(server.address, new_trust) is grpc.StatusCode.OK
            assert await check(server.address, old_trust) is grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_settings_from_env(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CERT_FILE",
        "KEY_FILE",
        "CLIENT_CA_FILE",
        "CA_FILE",
        "CLIENT_CERT_FILE",
        "CLIENT_KEY_FILE",
        "SERVER_NAME",
    ):
        monkeypatch.delenv(f"HASHMESH_TLS_{name}", raising=False)
    assert TlsSettings.from_env() == TlsSettings(None, None)
    assert TlsSettings.from_env().server_credentials() is None

    monkeypatch.setenv("HASHMESH_TLS_CERT_FILE", str(pki.server_cert))
    monkeypatch.setenv("HASHMESH_TLS_KEY_FILE", str(pki.server_key))
    monkeypatch.setenv("HASHMESH_TLS_CLIENT_CA_FILE", str(pki.ca_cert))
    monkeypatch.setenv("HASHMESH_TLS_CA_FILE", str(pki.ca_cert))
    monkeypatch.setenv("HASHMESH_TLS_SERVER_NAME", "hashd")
    settings = TlsSettings.from_env()
    assert settings.server == ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    assert settings.client == ClientTls(ca_file=str(pki.ca_cert), server_name="hashd")
    assert settings.client.channel_options()[0] == ("grpc.ssl_target_name_override", "hashd")
    assert settings.server_credentials() is not None

    monkeypatch.setenv("HASHMESH_TLS_CLIENT_CERT_FILE", str(pki.client_cert))
    with pytest.raises(SettingsError, match="HASHMESH_TLS_CLIENT_KEY_FILE"):
        TlsSettings.from_env()
    monkeypatch.delenv("HASHMESH_TLS_CLIENT_CERT_FILE")
    monkeypatch.delenv("HASHMESH_TLS_KEY_FILE")
    with pytest.raises(SettingsError, match="HASHMESH_TLS_KEY_FILE"):
        TlsSettings.from_env()


def test_missing_certificate_file_names_the_variable(tmp_path: Path) -> None:
    tls = ServerTls(str(tmp_path / "absent.pem"), str(tmp_path / "absent-key.pem"))
    with pytest.raises(SettingsError, match="HASHMESH_TLS_KEY_FILE"):
        tls.credentials()
    with pytest.raises(SettingsError, match="HASHMESH_TLS_CA_FILE"):
        ClientTls(ca_file=str(tmp_path / "absent-ca.pem")).credentials()

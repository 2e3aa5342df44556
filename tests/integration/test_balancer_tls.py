"""A real balancer serving TLS to clients and dialling real hashd replicas with mutual TLS,
configured by flags or by variables, with certificates made at test time (tests/certs.py).

Two unrelated CAs, as in a deployment: ``edge`` signs the balancer's certificate (what
clients trust), ``mesh`` signs the replicas' certificates and the balancer's client
certificate (what the replicas demand)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from hashmesh.core.tls import ClientTls
from hashmesh.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hash_pb2, hash_pb2_grpc
from tests.certs import Pki, channel, health, make_pki
from tests.conftest import Processes
from tests.procs import Proc, start_process

HELLO_SHA256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def mtls_hashd(procs: Processes, dsn: str, mesh: Pki) -> Proc:
    """hashd demanding a client certificate from ``mesh``'s CA. ``procs.hashd`` checks health
    over plaintext, so this waits for the ``listening on`` line (printed once serving)."""
    proc = start_process(
        "hashd",
        [
            "hashmesh.hashd",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            dsn,
            "--tls-cert",
            str(mesh.server_cert),
            "--tls-key",
            str(mesh.server_key),
            "--tls-client-ca",
            str(mesh.ca_cert),
        ],
        log_dir=procs.log_dir,
        expect=("hashd",),
    )
    procs.started.append(proc)
    return proc


def start_balancer(
    procs: Processes, replicas: list[Proc], *args: str, env: dict[str, str] | None = None
) -> Proc:
    proc = start_process(
        "balancer",
        [
            "hashmesh.balancer",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backends",
            ",".join(r.address for r in replicas),
            *args,
        ],
        log_dir=procs.log_dir,
        env=env,
        expect=("balancer", "balancer admin"),
    )
    procs.started.append(proc)
    return proc


def hash_hello(address: str, tls: ClientTls | None) -> str | grpc.StatusCode:
    with channel(address, tls) as ch:
        try:
            reply = hash_pb2_grpc.HashServiceStub(ch).Hash(
                hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"hello"),
                timeout=10,
            )
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return reply.result.encoded


def backend_states(balancer: Proc, tls: ClientTls) -> set[tuple[str, int]]:
    with channel(balancer.addresses["balancer admin"], tls) as ch:
        listed = admin_pb2_grpc.AdminServiceStub(ch).ListBackends(
            admin_pb2.ListBackendsRequest(), timeout=10
        )
    return {(b.address, b.state) for b in listed.backends}


def test_tls_clients_through_the_balancer_to_mutual_tls_replicas(
    procs: Processes, dsn: str, tmp_path: Path
) -> None:
    edge, mesh = make_pki(tmp_path / "edge"), make_pki(tmp_path / "mesh")
    replicas = [mtls_hashd(procs, dsn, mesh) for _ in range(2)]
    balancer = start_balancer(
        procs,
        replicas,
        "--tls-cert",
        str(edge.server_cert),
        "--tls-key",
        str(edge.server_key),
        "--upstream-tls-ca",
        str(mesh.ca_cert),
        "--upstream-tls-cert",
        str(mesh.client_cert),
        "--upstream-tls-key",
        str(mesh.client_key),
        "--upstream-tls-server-name",
        "localhost",
        "--strategy",
        "round_robin",
    )
    client = ClientTls(ca_file=str(edge.ca_cert))
    # The balancer's health says SERVING only once a replica passed a check: over mTLS.
    assert health(balancer.address, client) is grpc.StatusCode.OK
    # The admin listener serves the same certificate, and sees both replicas ready once each
    # passed its first check (the second can be a moment behind the first on a busy machine).
    ready = {(r.address, admin_pb2.BACKEND_STATE_READY) for r in replicas}
    deadline = time.monotonic() + 30
    while (states := backend_states(balancer, client)) != ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert states == ready
    # Round robin: both replicas answer over mutual TLS, with the right digest.
    assert [hash_hello(balancer.address, client) for _ in range(4)] == [HELLO_SHA256] * 4
    with channel(balancer.addresses["balancer admin"], client) as ch:
        listed = admin_pb2_grpc.AdminServiceStub(ch).ListBackends(
            admin_pb2.ListBackendsRequest(), timeout=10
        )
    assert all(b.calls == 2 for b in listed.backends)
    # Plaintext callers, or callers trusting another CA, get nothing from the balancer.
    assert hash_hello(balancer.address, None) is grpc.StatusCode.UNAVAILABLE
    assert (
        hash_hello(balancer.address, ClientTls(ca_file=str(mesh.ca_cert)))
        is grpc.StatusCode.UNAVAILABLE
    )
    assert health(balancer.addresses["balancer admin"], None) is grpc.StatusCode.UNAVAILABLE
    # A replica refuses a direct call without a client certificate, even from a caller that
    # trusts it; with the mesh's client certificate the same call goes through.
    replica = replicas[0].address
    assert hash_hello(replica, ClientTls(ca_file=str(mesh.ca_cert))) is grpc.StatusCode.UNAVAILABLE
    edge_cert = ClientTls(
        ca_file=str(mesh.ca_cert), cert_file=str(edge.client_cert), key_file=str(edge.client_key)
    )
    assert hash_hello(replica, edge_cert) is grpc.StatusCode.UNAVAILABLE
    mesh_cert = ClientTls(
        ca_file=str(mesh.ca_cert), cert_file=str(mesh.client_cert), key_file=str(mesh.client_key)
    )
    assert hash_hello(replica, mesh_cert) == HELLO_SHA256


def test_mutual_tls_at_the_balancer_from_environment_variables(
    procs: Processes, dsn: str, tmp_path: Path
) -> None:
    edge, mesh = make_pki(tmp_path / "edge"), make_pki(tmp_path / "mesh")
    replica = mtls_hashd(procs, dsn, mesh)
    balancer = start_balancer(
        procs,
        [replica],
        env={
            "HASHMESH_TLS_CERT_FILE": str(edge.server_cert),
            "HASHMESH_TLS_KEY_FILE": str(edge.server_key),
            "HASHMESH_TLS_CLIENT_CA_FILE": str(edge.ca_cert),
            "HASHMESH_BALANCER_UPSTREAM_TLS_CA_FILE": str(mesh.ca_cert),
            "HASHMESH_BALANCER_UPSTREAM_TLS_CLIENT_CERT_FILE": str(mesh.client_cert),
            "HASHMESH_BALANCER_UPSTREAM_TLS_CLIENT_KEY_FILE": str(mesh.client_key),
        },
    )
    ca = str(edge.ca_cert)
    with_cert = ClientTls(
        ca_file=ca, cert_file=str(edge.client_cert), key_file=str(edge.client_key)
    )
    assert hash_hello(balancer.address, with_cert) == HELLO_SHA256
    # The balancer demands a client certificate of its own CA, on both listeners.
    assert hash_hello(balancer.address, ClientTls(ca_file=ca)) is grpc.StatusCode.UNAVAILABLE
    mesh_cert = ClientTls(
        ca_file=ca, cert_file=str(mesh.client_cert), key_file=str(mesh.client_key)
    )
    assert hash_hello(balancer.address, mesh_cert) is grpc.StatusCode.UNAVAILABLE
    assert (
        health(balancer.addresses["balancer admin"], ClientTls(ca_file=ca))
        is grpc.StatusCode.UNAVAILABLE
    )
    assert health(balancer.addresses["balancer admin"], with_cert) is grpc.StatusCode.OK


def test_balancer_without_upstream_tls_cannot_use_mutual_tls_replicas(
    procs: Processes, dsn: str, tmp_path: Path
) -> None:
    """The shared caller variables (a health probe's) do not turn on TLS to the replicas."""
    mesh = make_pki(tmp_path / "mesh")
    replica = mtls_hashd(procs, dsn, mesh)
    balancer = start_balancer(
        procs,
        [replica],
        env={
            "HASHMESH_TLS_CA_FILE": str(mesh.ca_cert),
            "HASHMESH_TLS_CLIENT_CERT_FILE": str(mesh.client_cert),
            "HASHMESH_TLS_CLIENT_KEY_FILE": str(mesh.client_key),
        },
    )
    assert hash_hello(balancer.address, None) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--upstream-tls-ca", "/nonexistent/ca.pem"],
            "HASHMESH_BALANCER_UPSTREAM_TLS_CA_FILE: cannot read '/nonexistent/ca.pem'",
        ),
        (["--upstream-tls-cert", "/nonexistent/client.pem"], "--upstream-tls-key) go together"),
        (
            ["--tls-cert", "/nonexistent/server.pem", "--tls-key", "/nonexistent/key.pem"],
            "HASHMESH_TLS_KEY_FILE: cannot read '/nonexistent/key.pem'",
        ),
        (["--tls-client-ca", "/nonexistent/ca.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_balancer_refuses_to_start_with_bad_tls_settings(flags: list[str], expected: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hashmesh.balancer",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backends",
            "127.0.0.1:1",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert "listening on" not in done.stdout

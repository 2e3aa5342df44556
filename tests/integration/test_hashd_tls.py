"""A real hashd process serving TLS and mutual TLS, configured by flags or by HASHMESH_TLS_*
variables, with certificates made at test time (tests/certs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from hashmesh.core.tls import ClientTls
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc
from tests.certs import Pki, channel, health, make_pki
from tests.conftest import Processes
from tests.procs import Proc, start_process


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def start_tls_hashd(
    procs: Processes, dsn: str, pki: Pki, *, mutual: bool = False, by_env: bool = False
) -> Proc:
    """hashd with ``pki``'s server certificate (and its CA for client certificates when
    ``mutual``), from flags or from the environment. ``procs.hashd`` waits for health over
    plaintext, so this waits for the ``listening on`` line alone (printed once serving)."""
    files = {
        "cert": str(pki.server_cert),
        "key": str(pki.server_key),
        "client-ca": str(pki.ca_cert),
    }
    if not mutual:
        del files["client-ca"]
    env: dict[str, str] = {}
    flags: list[str] = []
    if by_env:
        names = {
            "cert": "HASHMESH_TLS_CERT_FILE",
            "key": "HASHMESH_TLS_KEY_FILE",
            "client-ca": "HASHMESH_TLS_CLIENT_CA_FILE",
        }
        env = {names[k]: v for k, v in files.items()}
    else:
        flags = [arg for k, v in files.items() for arg in (f"--tls-{k}", v)]
    proc = start_process(
        "hashd",
        ["hashmesh.hashd", "--listen", "127.0.0.1:0", "--database-url", dsn, *flags],
        log_dir=procs.log_dir,
        env=env,
        expect=("hashd",),
    )
    procs.started.append(proc)
    return proc


def test_hashd_serves_tls_to_callers_that_trust_its_ca(
    procs: Processes, dsn: str, pki: Pki, tmp_path: Path
) -> None:
    hashd = start_tls_hashd(procs, dsn, pki)
    trusted = ClientTls(ca_file=str(pki.ca_cert))
    assert health(hashd.address, trusted) is grpc.StatusCode.OK
    with channel(hashd.address, ClientTls(ca_file=str(pki.ca_cert), server_name="localhost")) as ch:
        reply = hash_pb2_grpc.HashServiceStub(ch).Hash(
            hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"hello"), timeout=10
        )
    assert (
        reply.result.encoded == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    # Plaintext callers and callers trusting another CA never get an answer.
    assert health(hashd.address, None) is grpc.StatusCode.UNAVAILABLE
    other = make_pki(tmp_path / "other")
    assert (
        health(hashd.address, ClientTls(ca_file=str(other.ca_cert))) is grpc.StatusCode.UNAVAILABLE
    )


def test_hashd_mutual_tls_from_env_refuses_callers_without_a_client_certificate(
    procs: Processes, dsn: str, pki: Pki, tmp_path: Path
) -> None:
    hashd = start_tls_hashd(procs, dsn, pki, mutual=True, by_env=True)
    ca = str(pki.ca_cert)
    assert health(hashd.address, ClientTls(ca_file=ca)) is grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA is refused too.
    other = make_pki(tmp_path / "other")
    foreign = ClientTls(
        ca_file=ca, cert_file=str(other.client_cert), key_file=str(other.client_key)
    )
    assert health(hashd.address, foreign) is grpc.StatusCode.UNAVAILABLE
    mine = ClientTls(ca_file=ca, cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    assert health(hashd.address, mine) is grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--tls-cert", "/nonexistent/server.pem", "--tls-key", "/nonexistent/key.pem"],
            "HASHMESH_TLS_KEY_FILE: cannot read '/nonexistent/key.pem'",
        ),
        (["--tls-client-ca", "/nonexistent/ca.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_hashd_refuses_to_start_with_bad_tls_settings(
    dsn: str, flags: list[str], expected: str
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hashmesh.hashd",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            dsn,
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert "listening on" not in done.stdout

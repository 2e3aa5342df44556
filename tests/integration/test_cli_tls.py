"""hashctl's TLS options against real hashd processes serving TLS and mutual TLS: flags, the
HASHMESH_TLS_* fallback, the exit code when the server cannot be trusted, and bench's load
channels (which go through the same credentials function)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from hashmesh.cli.client import ExitCode
from hashmesh.core.queue.embedded_pg import create_database
from tests.certs import Pki, make_pki
from tests.cli_helpers import hashctl
from tests.conftest import Processes
from tests.integration.test_hashd_tls import start_tls_hashd

HELLO = hashlib.sha256(b"hello").hexdigest()


@pytest.fixture(scope="module")
def module_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("cli-pki"))


@pytest.fixture(scope="module")
def tls_targets(
    pg_admin_dsn: str, pg_template: str, module_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(TLS hashd, mutual-TLS hashd) for the whole module."""
    name = f"hm_clitls_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_admin_dsn, name, template=pg_template)
    processes = Processes(log_dir=tmp_path_factory.mktemp("cli-tls-hashd"))
    try:
        tls = start_tls_hashd(processes, dsn, module_pki)
        mutual = start_tls_hashd(processes, dsn, module_pki, mutual=True)
        yield tls.address, mutual.address
    finally:
        processes.stop_all()
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_health_and_hash_over_tls_with_the_ca(
    tls_targets: tuple[str, str], module_pki: Pki
) -> None:
    target, _ = tls_targets
    ca = str(module_pki.ca_cert)
    result = hashctl("--target", target, "--tls-ca", ca, "health")
    assert result.exit_code == 0, result.stderr
    assert "SERVING" in result.stdout
    result = hashctl(
        "--target",
        target,
        "--tls-ca",
        ca,
        "--tls-server-name",
        "localhost",
        "hash",
        "sha256",
        "hello",
    )
    assert result.exit_code == 0, result.stderr
    assert HELLO in result.stdout


def test_without_the_ca_hashctl_cannot_reach_a_tls_server(
    tls_targets: tuple[str, str], tmp_path: Path
) -> None:
    target, _ = tls_targets
    plaintext = hashctl("--target", target, "--timeout", "3", "hash", "sha256", "hello")
    assert plaintext.exit_code == ExitCode.UNAVAILABLE, plaintext.stdout
    other = make_pki(tmp_path / "other")
    untrusted = hashctl(
        "--target", target, "--timeout", "3", "--tls-ca", str(other.ca_cert), "health"
    )
    assert untrusted.exit_code == ExitCode.UNAVAILABLE, untrusted.stdout
    assert "UNAVAILABLE" in untrusted.stderr and "--tls-ca" in untrusted.stderr
    assert HELLO not in plaintext.stdout + untrusted.stdout


def test_mutual_tls_needs_the_client_certificate(
    tls_targets: tuple[str, str], module_pki: Pki
) -> None:
    _, target = tls_targets
    ca = str(module_pki.ca_cert)
    refused = hashctl("--target", target, "--timeout", "3", "--tls-ca", ca, "health")
    assert refused.exit_code == ExitCode.UNAVAILABLE, refused.stdout
    ok = hashctl(
        "--target",
        target,
        "--tls-ca",
        ca,
        "--tls-cert",
        str(module_pki.client_cert),
        "--tls-key",
        str(module_pki.client_key),
        "hash",
        "sha256",
        "hello",
    )
    assert ok.exit_code == 0, ok.stderr
    assert HELLO in ok.stdout


def test_tls_options_fall_back_to_the_environment(
    tls_targets: tuple[str, str], module_pki: Pki
) -> None:
    _, target = tls_targets
    env = {
        "HASHMESH_TLS_CA_FILE": str(module_pki.ca_cert),
        "HASHMESH_TLS_CLIENT_CERT_FILE": str(module_pki.client_cert),
        "HASHMESH_TLS_CLIENT_KEY_FILE": str(module_pki.client_key),
    }
    result = hashctl("--target", target, "health", env=env)
    assert result.exit_code == 0, result.stderr
    # A flag overrides its variable: a key that does not exist is a usage error.
    result = hashctl("--target", target, "--tls-key", "/nonexistent/key.pem", "health", env=env)
    assert result.exit_code == ExitCode.USAGE
    assert "/nonexistent/key.pem" in result.stderr


def test_half_a_client_certificate_is_a_usage_error(module_pki: Pki) -> None:
    result = hashctl("--target", "127.0.0.1:1", "--tls-cert", str(module_pki.client_cert), "health")
    assert result.exit_code == ExitCode.USAGE
    assert "--tls-key" in result.stderr


def test_bench_loads_a_mutual_tls_server(tls_targets: tuple[str, str], module_pki: Pki) -> None:
    _, target = tls_targets
    result = hashctl(
        "--target",
        target,
        "--tls-ca",
        str(module_pki.ca_cert),
        "--tls-cert",
        str(module_pki.client_cert),
        "--tls-key",
        str(module_pki.client_key),
        "bench",
        "-n",
        "20",
        "-c",
        "2",
        "-d",
        '{"algorithm":"ALGORITHM_SHA256","data":"aGVsbG8="}',
        "-O",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["statusCodeDistribution"] == {"OK": 20}
    assert report["options"]["insecure"] is False
    # Without the client certificate every call fails the same way.
    result = hashctl(
        "--target",
        target,
        "--tls-ca",
        str(module_pki.ca_cert),
        "bench",
        "-n",
        "4",
        "-c",
        "1",
        "-t",
        "3s",
        "-d",
        '{"algorithm":"ALGORITHM_SHA256","data":"aGVsbG8="}',
        "-O",
        "json",
    )
    assert "OK" not in json.loads(result.stdout)["statusCodeDistribution"]

"""The balancer's metrics and TLS settings, and how its snapshot becomes metrics."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hashmesh.balancer.budgets import UPLOAD, Budgets, BudgetSettings
from hashmesh.balancer.config import BalancerSettings
from hashmesh.balancer.metrics import CallMetrics, reading
from hashmesh.balancer.stats import ReplicaSnapshot, Snapshot
from hashmesh.core.metrics import final_code
from hashmesh.core.settings import SettingsError
from hashmesh.core.tls import ClientTls, ServerTls

UPSTREAM = "HASHMESH_BALANCER_UPSTREAM_TLS_"


def test_upstream_tls_comes_from_the_balancers_own_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(UPSTREAM + "CA_FILE", "/pki/mesh-ca.pem")
    monkeypatch.setenv(UPSTREAM + "CLIENT_CERT_FILE", "/pki/balancer.pem")
    monkeypatch.setenv(UPSTREAM + "CLIENT_KEY_FILE", "/pki/balancer-key.pem")
    monkeypatch.setenv(UPSTREAM + "SERVER_NAME", "hashd")
    monkeypatch.setenv("HASHMESH_TLS_CERT_FILE", "/pki/edge.pem")
    monkeypatch.setenv("HASHMESH_TLS_KEY_FILE", "/pki/edge-key.pem")
    settings = BalancerSettings.from_env()
    assert settings.upstream_tls == ClientTls(
        ca_file="/pki/mesh-ca.pem",
        cert_file="/pki/balancer.pem",
        key_file="/pki/balancer-key.pem",
        server_name="hashd",
    )
    assert settings.tls == ServerTls(cert_file="/pki/edge.pem", key_file="/pki/edge-key.pem")
    # A flag replaces its variable alone.
    flagged = settings.with_upstream_tls("/other/ca.pem", None, None, None)
    assert flagged.upstream_tls is not None
    assert flagged.upstream_tls.ca_file == "/other/ca.pem"
    assert flagged.upstream_tls.cert_file == "/pki/balancer.pem"


def test_shared_caller_variables_do_not_turn_on_upstream_tls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HASHMESH_TLS_CA_FILE", "/pki/ca.pem")
    settings = BalancerSettings.from_env()
    assert settings.upstream_tls is None and settings.tls is None
    assert settings.metrics_port is None


def test_upstream_client_certificate_needs_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(UPSTREAM + "CLIENT_CERT_FILE", "/pki/balancer.pem")
    with pytest.raises(SettingsError, match=UPSTREAM + "CLIENT_CERT_FILE and"):
        BalancerSettings.from_env()
    with pytest.raises(SettingsError, match="--tls-cert and --tls-key go together"):
        BalancerSettings().with_tls_files(None, None, "/pki/ca.pem")


def test_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HASHMESH_BALANCER_METRICS_PORT", "9100")
    assert BalancerSettings.from_env().metrics_port == 9100
    assert BalancerSettings().with_overrides(metrics_port=0).metrics_port == 0
    with pytest.raises(SettingsError, match="METRICS_PORT"):
        BalancerSettings(metrics_port=70000)


def test_reading_maps_replica_states() -> None:
    replicas = [
        ReplicaSnapshot("10.0.0.1:50051", "dns", "ready", 3, 100, 2, 0, 0.0, 0.0, 0.001),
        ReplicaSnapshot("10.0.0.2:50051", "dns", "draining", 1, 50, 0, 1, 0.0, 0.0, 0.001),
    ]
    snap = Snapshot(
        calls=150,
        retries=4,
        no_backend=1,
        rate_limited=7,
        uptime=5.0,
        strategy="least_connections",
        replicas=replicas,
        top_refused=[],
        unauthenticated=2,
    )
    read = reading(snap)
    assert [(b.address, b.up, b.state, b.in_flight, b.calls) for b in read.backends] == [
        ("10.0.0.1:50051", True, "ready", 3, 100),
        ("10.0.0.2:50051", False, "draining", 1, 50),
    ]
    assert (read.calls, read.retries, read.no_backend, read.rate_limited, read.unauthenticated) == (
        150,
        4,
        1,
        7,
        2,
    )


def test_reading_carries_the_budgets_in_use_by_kind_only() -> None:
    budgets = Budgets(BudgetSettings())
    budgets.take("ip:127.0.0.2", UPLOAD)
    snap = Snapshot(0, 0, 0, 0, 1.0, "round_robin", [], [], budgets=budgets.snapshot(0))
    read = reading(snap)
    assert read.budget_in_use == {
        "unary_calls": 0,
        "upload_streams": 1,
        "watch_streams": 0,
        "other_streams": 0,
        "request_bytes": 0,
    }
    assert read.budget_limits["upload_streams"] == BudgetSettings().total_upload_streams
    off = Budgets(BudgetSettings(enabled=False)).snapshot(0)
    read = reading(Snapshot(0, 0, 0, 0, 1.0, "round_robin", [], [], budgets=off))
    assert read.budget_in_use == {} and read.budget_limits == {}


def test_call_metrics_labels_are_bounded_to_the_mesh_methods() -> None:
    calls = CallMetrics()
    hash_calls = calls.method("/hashmesh.v1.HashService/Hash")
    assert hash_calls is calls.method("/hashmesh.v1.HashService/Hash")
    invented = calls.method("/evil.Service/client-1234")
    assert invented is calls.method("/evil.Service/client-5678")
    assert invented is not hash_calls


class _Context:
    def __init__(self, code: object) -> None:
        self._code = code

    def code(self) -> object:
        return self._code


def test_final_code() -> None:
    aborted = grpc.aio.AbortError()
    assert (
        final_code(_Context(grpc.StatusCode.RESOURCE_EXHAUSTED), aborted)
        is grpc.StatusCode.RESOURCE_EXHAUSTED
    )  # type: ignore[arg-type]
    assert final_code(_Context(None), asyncio.CancelledError()) is grpc.StatusCode.CANCELLED  # type: ignore[arg-type]
    assert final_code(_Context(None), RuntimeError()) is grpc.StatusCode.UNKNOWN  # type: ignore[arg-type]

"""What the balancer forwards of a call's metadata, and whom it takes the caller for."""

from __future__ import annotations

import asyncio

import pytest

from hashmesh.balancer.interceptors import AdminPolicy, Identify, read_call
from hashmesh.balancer.stats import BalancerStats, LatencyWindow
from hashmesh.core.errors import PermissionDenied, Unauthenticated


def test_hop_by_hop_headers_are_dropped_and_the_caller_is_appended() -> None:
    incoming = [
        ("user-agent", "grpc-python"), ("te", "trailers"), ("x-api-key", "hm_secret"),
        ("x-client-id", "alice"), ("x-forwarded-for", "10.1.1.1"), ("trace-bin", b"\x00\x01"),
        ("x-shard", "7"),
    ]
    call = read_call("/hashmesh.v1.HashService/Hash", "ipv4:127.0.0.9:5555", incoming, "x-shard")
    assert call.metadata == [
        ("x-client-id", "alice"), ("trace-bin", b"\x00\x01"), ("x-shard", "7"),
        ("x-forwarded-for", "10.1.1.1, 127.0.0.9"),
    ]
    assert call.api_key == "hm_secret" and call.client_id == "alice" and call.hash_value == "7"
    v6 = read_call("/m", "ipv6:[::1]:5555", None, "x-client-id")
    assert v6.metadata == [("x-forwarded-for", "::1")]


def test_identify_uses_client_id_or_address() -> None:
    stats = BalancerStats()
    call = read_call("/m", "ipv4:10.0.0.5:1", [("x-client-id", "bob")], "x-client-id")
    asyncio.run(Identify(None, "client_id", stats).admit(call))
    assert call.client == "bob"
    asyncio.run(Identify(None, "address", stats).admit(call))
    assert call.client == "10.0.0.5"


def test_admin_policy() -> None:
    AdminPolicy("", open_without_token=True).check(None)
    with pytest.raises(PermissionDenied):
        AdminPolicy("", open_without_token=False).check(None)
    policy = AdminPolicy("tok", open_without_token=True)
    policy.check([("authorization", "Bearer tok")])
    for metadata in (None, [("authorization", "Bearer nope")], [("authorization", "tok")]):
        with pytest.raises(Unauthenticated):
            policy.check(metadata)


def test_latency_window_percentiles() -> None:
    window = LatencyWindow(100)
    for value in range(1, 201):
        window.record(value / 1000)
    assert window.percentile(0.5) == pytest.approx(0.151)
    assert window.percentile(0.99) == pytest.approx(0.200)

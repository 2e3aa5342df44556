"""What the balancer forwards of a call's metadata, and whom it takes the caller for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hashmesh.balancer.interceptors import (
    AdminPolicy,
    CallInfo,
    Identify,
    TrustedProxies,
    read_call,
)
from hashmesh.balancer.keys import ApiKeys, generate_key, key_line
from hashmesh.balancer.ratelimit import RateLimiter
from hashmesh.balancer.stats import BalancerStats, LatencyWindow
from hashmesh.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from hashmesh.core.identity import parse_networks


def test_hop_by_hop_headers_credentials_and_claims_are_dropped_and_the_caller_is_appended() -> None:
    incoming = [
        ("user-agent", "grpc-python"),
        ("te", "trailers"),
        ("x-api-key", "hm_secret"),
        ("x-client-id", "alice"),
        ("x-forwarded-for", "10.1.1.1"),
        ("trace-bin", b"\x00\x01"),
        ("x-shard", "7"),
        ("authorization", "bearer tok"),
        ("x-hashmesh-identity", "root"),
        ("x-hashmesh-identity-sig", "v1;operator;9999999999;00"),
    ]
    call = read_call("/hashmesh.v1.HashService/Hash", "ipv4:127.0.0.9:5555", incoming, "x-shard")
    assert call.metadata == [
        ("trace-bin", b"\x00\x01"),
        ("x-shard", "7"),
        ("x-forwarded-for", "10.1.1.1, 127.0.0.9"),
    ]
    assert call.api_key == "hm_secret" and call.client_id == "alice" and call.hash_value == "7"
    assert call.bearer == "tok"  # the scheme is case-insensitive
    v6 = read_call("/m", "ipv6:[::1]:5555", None, "x-client-id")
    assert v6.metadata == [("x-forwarded-for", "::1")]


def _identify(
    peer: str,
    metadata: list[tuple[str, str | bytes]],
    *,
    trusted: tuple[str, ...] = (),
    admin_token: str = "",
    keys: ApiKeys | None = None,
) -> CallInfo:
    call = read_call("/m", peer, metadata, "x-client-id")
    networks = TrustedProxies(parse_networks(trusted, "test"))
    asyncio.run(
        Identify(keys, networks, admin_token, BalancerStats(), RateLimiter(None)).admit(call)
    )
    return call


def test_identity_is_the_peer_address_whatever_the_caller_claims() -> None:
    claims: list[tuple[str, str | bytes]] = [
        ("x-client-id", "bob"),
        ("x-forwarded-for", "10.9.9.9"),
    ]
    assert _identify("ipv4:10.0.0.5:1", claims).client == "ip:10.0.0.5"
    assert _identify("ipv4:10.0.0.5:2", []).client == "ip:10.0.0.5"  # the port is not the peer
    assert _identify("ipv6:[::1]:7", claims).client == "ip:::1"
    assert _identify("ipv4:10.0.0.5:1", claims, trusted=("10.1.0.0/16",)).client == "ip:10.0.0.5"


def test_a_trusted_proxy_vouches_for_client_id_or_the_first_untrusted_hop() -> None:
    trusted = ("10.0.0.0/24", "192.168.0.7")
    assert _identify("ipv4:10.0.0.5:1", [("x-client-id", "bob")], trusted=trusted).client == "bob"
    hops: list[tuple[str, str | bytes]] = [("x-forwarded-for", "6.6.6.6, 203.0.113.9, 192.168.0.7")]
    assert _identify("ipv4:10.0.0.5:1", hops, trusted=trusted).client == "ip:203.0.113.9"
    garbled: list[tuple[str, str | bytes]] = [("x-forwarded-for", "not-an-ip")]
    assert _identify("ipv4:10.0.0.5:1", garbled, trusted=trusted).client == "ip:10.0.0.5"
    with pytest.raises(InvalidArgument):  # a proxy cannot name an address identity
        _identify("ipv4:10.0.0.5:1", [("x-client-id", "ip:1.2.3.4")], trusted=trusted)


def test_api_keys_decide_and_the_admin_token_adds_the_operator_role(tmp_path: Path) -> None:
    key = generate_key()
    (tmp_path / "keys").write_text(key_line("alice", key) + "\n")
    keys = ApiKeys(str(tmp_path / "keys"))
    alice = _identify("ipv4:10.0.0.5:1", [("x-api-key", key), ("x-client-id", "bob")], keys=keys)
    assert alice.client == "alice" and not alice.operator
    with pytest.raises(Unauthenticated):
        _identify("ipv4:10.0.0.5:1", [("x-client-id", "bob")], keys=keys)
    operator = _identify(
        "ipv4:10.0.0.5:1", [("authorization", "BEARER tok")], keys=keys, admin_token="tok"
    )
    assert operator.operator and operator.client == "ip:10.0.0.5"
    with pytest.raises(Unauthenticated):
        _identify("ipv4:10.0.0.5:1", [("authorization", "Bearer nope")], admin_token="tok")
    # No admin token configured: nobody is an operator, the header is just dropped.
    assert not _identify("ipv4:10.0.0.5:1", [("authorization", "Bearer x")]).operator


def test_admin_policy() -> None:
    AdminPolicy("", open_without_token=True).check(None)
    with pytest.raises(PermissionDenied):
        AdminPolicy("", open_without_token=False).check(None)
    policy = AdminPolicy("tok", open_without_token=True)
    for scheme in ("Bearer", "bearer", "BEARER"):
        policy.check([("authorization", f"{scheme} tok")])
    for metadata in (
        None,
        [("authorization", "Bearer nope")],
        [("authorization", "tok")],
        [("authorization", "Basic tok")],
    ):
        with pytest.raises(Unauthenticated):
            policy.check(metadata)


def test_latency_window_percentiles() -> None:
    window = LatencyWindow(100)
    for value in range(1, 201):
        window.record(value / 1000)
    assert window.percentile(0.5) == pytest.approx(0.151)
    assert window.percentile(0.99) == pytest.approx(0.200)

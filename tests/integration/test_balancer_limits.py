"""Rate limiting and client API keys through a real balancer process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from hashmesh.balancer import keys
from hashmesh.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hash_pb2
from tests.integration.test_balancer_proxy import start_backends, start_balancer, wait_in_flight
from tests.procs import start_process, wait_serving

HASH = "/hashmesh.v1.HashService/Hash"
REQUEST = hash_pb2.HashRequest(
    algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc"
).SerializeToString()  # type: ignore[arg-type]


async def _paced(
    address: str, client: str, per_second: float, seconds: float
) -> tuple[int, int, float, list[grpc.aio.AioRpcError]]:
    """Send at ``per_second`` for ``seconds`` without waiting for answers; count outcomes."""
    accepted = refused = 0
    refusals: list[grpc.aio.AioRpcError] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(HASH)

        async def one() -> None:
            nonlocal accepted, refused
            try:
                await call(REQUEST, timeout=10, metadata=(("x-client-id", client),))
                accepted += 1
            except grpc.aio.AioRpcError as err:
                assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err
                refused += 1
                refusals.append(err)

        started = time.monotonic()
        tasks = []
        sent = 0
        while (elapsed := time.monotonic() - started) < seconds:
            while sent < elapsed * per_second:
                sent += 1
                tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started  # every call's arrival at the balancer is within
    return accepted, refused, elapsed, refusals


def test_flooding_client_gets_its_limit_and_others_are_unaffected(tmp_path: Path) -> None:
    backends = start_backends(tmp_path, 2)
    # The test's clients come through 127.0.0.1, trusted here as a proxy so that x-client-id
    # names each (tests/adversarial/test_identity.py: from an untrusted caller it counts for nothing).
    balancer = start_balancer(
        tmp_path,
        backends,
        "--rate-limit",
        "20/5",
        env={"HASHMESH_BALANCER_TRUSTED_PROXIES": "127.0.0.1"},
    )
    address = balancer.addresses["balancer"]
    try:

        async def both() -> tuple[tuple[int, int, float, list[grpc.aio.AioRpcError]], ...]:
            return tuple(
                await asyncio.gather(
                    _paced(address, "flooder", 200, 2.0), _paced(address, "polite", 8, 2.0)
                )
            )

        (flooded, refused, elapsed, refusals), (polite_ok, polite_refused, _, _) = asyncio.run(
            both()
        )
        # A token bucket never admits more than burst + rate x the time the calls spanned; the
        # flood offers ten times that, so it gets most of it even when a loaded machine
        # bunches the calls up (arrivals in bursts waste some refill).
        most = 5 + 20 * elapsed
        assert most / 2 <= flooded <= most + 1, (flooded, most)
        assert refused > 0 and polite_refused == 0 and polite_ok > 0
        trailing = dict(refusals[0].trailing_metadata() or ())
        assert int(trailing["retry-after"]) >= 1 and "grpc-status-details-bin" in trailing
        assert 0 < int(trailing["grpc-retry-pushback-ms"]) <= 1000  # gRFC A6
        # The IETF RateLimit fields: a refusal has them in its headers and its trailers.
        for refused_fields in (refusals[0].initial_metadata(), refusals[0].trailing_metadata()):
            assert dict(refused_fields)["ratelimit-policy"] == '"default";q=5;w=1'
            assert dict(refused_fields)["ratelimit"].startswith('"default";r=0;t=')

        with grpc.insecure_channel(address) as channel:
            _, call = channel.unary_unary(HASH).with_call(
                REQUEST, timeout=5, metadata=[("x-client-id", "fresh")]
            )
            # 4 of 5 left is far from exhaustion: trailers only.
            trailing = dict(call.trailing_metadata())
            assert trailing["ratelimit-policy"] == '"default";q=5;w=1'
            assert trailing["ratelimit"] == '"default";r=4;t=1'
            assert "ratelimit" not in dict(call.initial_metadata())
        with grpc.insecure_channel(balancer.addresses["balancer admin"]) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            stats = admin.GetStats(admin_pb2.GetStatsRequest(top_peers=1), timeout=5)
            assert stats.top_refused_peers[0].peer == "flooder" and stats.rate_limited == refused
            changed = admin.SetRateLimits(
                admin_pb2.SetRateLimitsRequest(
                    upsert_overrides=[
                        admin_pb2.ClientRateLimit(
                            client_id="flooder",
                            limit=admin_pb2.RateLimit(rate_per_second=1000, burst=1000),
                        )
                    ]
                ),
                timeout=5,
            )
            assert [o.client_id for o in changed.overrides] == ["flooder"]
            with pytest.raises(grpc.RpcError) as bad:
                admin.SetRateLimits(
                    admin_pb2.SetRateLimitsRequest(default_limit=admin_pb2.RateLimit()), timeout=5
                )
            assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            # Rates the bucket cannot represent are refused instead of failing every call.
            for rate in (float("inf"), 1e-300, float("nan")):
                with pytest.raises(grpc.RpcError) as bad:
                    admin.SetRateLimits(
                        admin_pb2.SetRateLimitsRequest(
                            default_limit=admin_pb2.RateLimit(rate_per_second=rate, burst=1)
                        ),
                        timeout=5,
                    )
                assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT, rate  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as bad:
                admin.SetRateLimits(
                    admin_pb2.SetRateLimitsRequest(
                        upsert_overrides=[
                            admin_pb2.ClientRateLimit(
                                client_id="c" * 100_000,
                                limit=admin_pb2.RateLimit(rate_per_second=5),
                            )
                        ]
                    ),
                    timeout=5,
                )
            assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            # The slowest allowed rate: a refusal carries a finite retry-after.
            admin.SetRateLimits(
                admin_pb2.SetRateLimitsRequest(
                    upsert_overrides=[
                        admin_pb2.ClientRateLimit(
                            client_id="slowest",
                            limit=admin_pb2.RateLimit(rate_per_second=1e-3, burst=1),
                        )
                    ]
                ),
                timeout=5,
            )
        with grpc.insecure_channel(address) as channel:
            slowest = [("x-client-id", "slowest")]
            channel.unary_unary(HASH)(REQUEST, timeout=5, metadata=slowest)
            with pytest.raises(grpc.RpcError) as limited:
                channel.unary_unary(HASH)(REQUEST, timeout=5, metadata=slowest)
            assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert 900 < int(dict(limited.value.trailing_metadata())["retry-after"]) <= 1000  # type: ignore[attr-defined]
        with grpc.insecure_channel(address) as channel:
            _, call = channel.unary_unary(HASH).with_call(
                REQUEST, timeout=5, metadata=[("x-client-id", "flooder")]
            )
            assert dict(call.trailing_metadata())["ratelimit-policy"] == '"client";q=1000;w=1'
    finally:
        balancer.terminate()
        for backend in backends:
            backend.terminate()


def _fields(metadata: object) -> dict[str, str]:
    """The IETF RateLimit fields among ``metadata`` (headers or trailers)."""
    pairs = dict(metadata or ())  # type: ignore[call-overload]
    return {key: pairs[key] for key in ("ratelimit-policy", "ratelimit") if key in pairs}


def test_ratelimit_fields_ride_trailers_and_reach_headers_near_exhaustion(tmp_path: Path) -> None:
    # A burst of 4 refilled at one call per 1,000 s: no token comes back during the test, so
    # every count below is exact however slow the machine is.
    backends = start_backends(tmp_path, 1)
    near = start_balancer(
        tmp_path,
        backends,
        "--rate-limit",
        "0.001/4",
        env={"HASHMESH_BALANCER_TRUSTED_PROXIES": "127.0.0.1"},  # x-client-id names the client
    )
    always = start_balancer(
        tmp_path,
        backends,
        "--rate-limit",
        "0.001/4",
        env={"HASHMESH_BALANCER_RATELIMIT_HEADERS": "always"},
    )
    policy = '"default";q=4;w=4000'
    try:
        with grpc.insecure_channel(near.addresses["balancer"]) as channel:
            call = channel.unary_unary(HASH)
            seen = []
            for _ in range(4):
                _, done = call.with_call(REQUEST, timeout=10)
                headers, trailers = (
                    _fields(done.initial_metadata()),
                    _fields(done.trailing_metadata()),
                )
                # Every answer's trailers carry them, next to the replica's own trailers.
                assert trailers["ratelimit-policy"] == policy
                assert dict(done.trailing_metadata())["x-path"]
                seen.append((trailers["ratelimit"], headers))
            # 3 of 4 left is far from exhaustion: not in the headers; from half the burst on
            # the headers carry the same values as the trailers.
            assert seen == [
                ('"default";r=3;t=1000', {}),
                (
                    '"default";r=2;t=2000',
                    {"ratelimit-policy": policy, "ratelimit": '"default";r=2;t=2000'},
                ),
                (
                    '"default";r=1;t=3000',
                    {"ratelimit-policy": policy, "ratelimit": '"default";r=1;t=3000'},
                ),
                (
                    '"default";r=0;t=4000',
                    {"ratelimit-policy": policy, "ratelimit": '"default";r=0;t=4000'},
                ),
            ]
            # A stream sends headers anyway: far from exhaustion too, the fields are in them
            # (and in its trailers).
            upload = channel.stream_unary("/hashmesh.v1.HashService/HashStream")
            chunks = iter([hash_pb2.HashStreamRequest(chunk=b"abc").SerializeToString()])
            _, done = upload.with_call(chunks, timeout=10, metadata=[("x-client-id", "streamer")])
            expected = {"ratelimit-policy": policy, "ratelimit": '"default";r=3;t=1000'}
            assert _fields(done.initial_metadata()) == expected
            assert _fields(done.trailing_metadata()) == expected
            # The refusal is as it always was: fields in the headers, RetryInfo, retry-after
            # and grpc-retry-pushback-ms in the trailers (and the fields there too).
            with pytest.raises(grpc.RpcError) as refused:
                call(REQUEST, timeout=10)
            error = refused.value
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            headers = _fields(error.initial_metadata())  # type: ignore[attr-defined]
            assert headers["ratelimit-policy"] == policy
            assert headers["ratelimit"].startswith('"default";r=0;t=')
            trailing = dict(error.trailing_metadata())  # type: ignore[attr-defined]
            assert 900 < int(trailing["retry-after"]) <= 1000
            assert int(trailing["grpc-retry-pushback-ms"]) > 0
            assert "grpc-status-details-bin" in trailing
            assert _fields(trailing) == headers
        with grpc.insecure_channel(always.addresses["balancer"]) as channel:
            _, done = channel.unary_unary(HASH).with_call(REQUEST, timeout=10)
            # HASHMESH_BALANCER_RATELIMIT_HEADERS=always: in the headers of the first answer.
            expected = {"ratelimit-policy": policy, "ratelimit": '"default";r=3;t=1000'}
            assert _fields(done.initial_metadata()) == expected
            assert _fields(done.trailing_metadata()) == expected
    finally:
        near.terminate()
        always.terminate()
        for backend in backends:
            backend.terminate()


def test_api_keys_identify_clients_and_bind_their_limit(tmp_path: Path) -> None:
    key_a, key_b = keys.generate_key(), keys.generate_key()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{keys.key_line('team-a', key_a)}\n{keys.key_line('team-b', key_b)}\n")
    assert key_a not in keys_file.read_text()
    backends = start_backends(tmp_path, 1)
    balancer = start_balancer(
        tmp_path, backends, "--api-keys-file", str(keys_file), "--rate-limit", "1/3"
    )
    try:
        with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
            call = channel.unary_unary(HASH)
            for metadata in ([], [("x-api-key", "hm_wrong")]):
                with pytest.raises(grpc.RpcError) as refused:
                    call(REQUEST, timeout=5, metadata=metadata)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            # Changing x-client-id does not dodge the key's limit (burst 3), and the replica
            # hears the authenticated client from the stamp, never the claimed one.
            seen = set()
            for index in range(3):
                _, done = call.with_call(
                    REQUEST,
                    timeout=5,
                    metadata=[("x-api-key", key_a), ("x-client-id", f"fake-{index}")],
                )
                trailing = dict(done.trailing_metadata())
                seen.add((trailing["x-seen-identity"], trailing["x-seen-client-id"]))
            assert seen == {("team-a", "")}
            with pytest.raises(grpc.RpcError) as limited:
                call(REQUEST, timeout=5, metadata=[("x-api-key", key_a), ("x-client-id", "fake-9")])
            assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            call(REQUEST, timeout=5, metadata=[("x-api-key", key_b)])
    finally:
        balancer.terminate()
        for backend in backends:
            backend.terminate()


def test_in_flight_cap_spills_then_fails_fast_and_dns_finds_replicas(tmp_path: Path) -> None:
    backends = start_backends(tmp_path, 1)
    port = backends[0].address.rsplit(":", 1)[1]
    balancer = start_process(
        "balancer",
        [
            "hashmesh.balancer",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backends-dns",
            f"localhost:{port}",
        ],
        log_dir=tmp_path,
        env={
            "HASHMESH_BALANCER_MAX_IN_FLIGHT": "1",
            "HASHMESH_BALANCER_HEALTH_INTERVAL": "0.2",
            "HASHMESH_BALANCER_HEALTH_TIMEOUT": "5",
        },
        expect=("balancer", "balancer admin"),
    )
    try:
        wait_serving(balancer.addresses["balancer"])
        with grpc.insecure_channel(balancer.addresses["balancer admin"]) as channel:
            listed = admin_pb2_grpc.AdminServiceStub(channel).ListBackends(
                admin_pb2.ListBackendsRequest(), timeout=5
            )
        ready = [b for b in listed.backends if b.state == admin_pb2.BACKEND_STATE_READY]
        assert [b.address for b in ready] == [f"127.0.0.1:{port}"] and ready[0].source == "dns"
        with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
            call = channel.unary_unary(HASH)
            slow = call.future(REQUEST, timeout=10, metadata=[("x-test-sleep", "1")])
            wait_in_flight(balancer.addresses["balancer admin"], 1)
            with pytest.raises(grpc.RpcError) as full:
                call(REQUEST, timeout=5)
            assert full.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "in-flight cap" in (full.value.details() or "")  # type: ignore[attr-defined]
            assert slow.result()
            assert call(REQUEST, timeout=5)
    finally:
        balancer.terminate()
        for backend in backends:
            backend.terminate()

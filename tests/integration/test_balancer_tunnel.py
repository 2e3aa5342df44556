"""The tunnel between balancer and replicas: small unary calls ride it with their semantics
intact, everything else goes as calls of their own, and no client can reach it."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_status import rpc_status

from hashmesh.core.tunnel import TUNNEL_METHOD, decode_replies, encode_call
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc
from tests.integration.test_balancer_proxy import start_backends, start_balancer
from tests.procs import Proc

SHA256 = common_pb2.ALGORITHM_SHA256
HASH = "/hashmesh.v1.HashService/Hash"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, list[Proc]]]:
    log_dir = tmp_path_factory.mktemp("tunnel")
    backends = start_backends(log_dir, 2)
    balancer = start_balancer(log_dir, backends, "--strategy", "round_robin")
    try:
        yield balancer, backends
    finally:
        for proc in (balancer, *backends):
            proc.terminate()


def _hash(data: bytes) -> hash_pb2.HashRequest:
    return hash_pb2.HashRequest(algorithm=SHA256, data=data)  # type: ignore[arg-type]


def test_small_unary_calls_ride_the_tunnel_with_metadata_deadline_and_errors(
    mesh: tuple[Proc, list[Proc]],
) -> None:
    balancer, _ = mesh
    with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
        hashes = hash_pb2_grpc.HashServiceStub(channel)
        reply, call = hashes.Hash.with_call(
            _hash(b"abc"),
            timeout=4,
            metadata=[("x-client-id", "alice"), ("trace-bin", b"\x00\x01")],
        )
        seen = dict(call.trailing_metadata())
        assert reply.result.encoded.startswith("ba7816bf")
        # The balancer's stamp reaches the replica through the tunnel; the claimed id does not.
        assert seen["x-path"] == "tunnel" and seen["x-seen-identity"] == "ip:127.0.0.1"
        assert seen["x-seen-client-id"] == ""
        assert (
            0.0 < float(seen["x-remaining"]) <= 4.1
        )  # it arrived, less what load made the hop take
        assert dict(call.initial_metadata())["x-initial"] == seen["x-backend"]
        with pytest.raises(grpc.RpcError) as failed:
            hashes.Hash(_hash(b"abc"), timeout=5, metadata=[("x-test-error", "rich")])
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert rpc_status.from_call(failed.value) is not None  # type: ignore[arg-type]
        assert dict(failed.value.trailing_metadata())["x-custom"] == "kept"  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as late:
            hashes.Hash(_hash(b"abc"), timeout=0.3, metadata=[("x-test-sleep", "5")])
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


def test_a_large_request_goes_as_a_call_of_its_own(mesh: tuple[Proc, list[Proc]]) -> None:
    balancer, _ = mesh
    with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
        _, call = hash_pb2_grpc.HashServiceStub(channel).Hash.with_call(
            _hash(b"x" * 300_000), timeout=10
        )
        assert dict(call.trailing_metadata())["x-path"] == "call"


def test_calls_in_flight_together_each_get_their_own_answer(mesh: tuple[Proc, list[Proc]]) -> None:
    balancer, _ = mesh

    async def many() -> list[bytes]:
        async with grpc.aio.insecure_channel(balancer.addresses["balancer"]) as channel:
            stub = hash_pb2_grpc.HashServiceStub(channel)
            replies = await asyncio.gather(
                *(stub.Hash(_hash(str(i).encode()), timeout=20) for i in range(300))
            )
            return [r.result.digest for r in replies]

    assert asyncio.run(many()) == [hashlib.sha256(str(i).encode()).digest() for i in range(300)]


def test_clients_cannot_reach_the_tunnel_through_the_balancer(
    mesh: tuple[Proc, list[Proc]],
) -> None:
    balancer, _ = mesh
    frame = encode_call(
        1, HASH, (("x-client-id", "forged"),), None, _hash(b"abc").SerializeToString()
    )
    with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
        stream = channel.stream_stream(TUNNEL_METHOD)(iter([frame]), timeout=5)
        with pytest.raises(grpc.RpcError) as refused:
            list(stream)
    assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_junk_on_a_replica_tunnel_ends_that_stream_only(mesh: tuple[Proc, list[Proc]]) -> None:
    _, backends = mesh
    with grpc.insecure_channel(backends[0].address) as channel:
        tunnel = channel.stream_stream(TUNNEL_METHOD)
        with pytest.raises(grpc.RpcError) as refused:
            list(tunnel(iter([b"\x01\x02\x03"]), timeout=5))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        # A well-formed frame on a new stream is answered; an unknown method says so.
        frames = [
            encode_call(1, HASH, (), 5.0, _hash(b"abc").SerializeToString()),
            encode_call(2, "/hashmesh.v1.HashService/Nope", (), 5.0, b""),
        ]
        replies = [
            r
            for message in tunnel(iter([b"".join(frames)]), timeout=5)
            for r in decode_replies(message)
        ]
        by_id = {r.call_id: r for r in replies}
        assert by_id[1].code is grpc.StatusCode.OK
        assert hash_pb2.HashResponse.FromString(by_id[1].payload).result.encoded.startswith(
            "ba7816bf"
        )
        assert by_id[2].code is grpc.StatusCode.UNIMPLEMENTED


def test_a_replica_without_the_tunnel_gets_calls_of_their_own(tmp_path: Path) -> None:
    """A replica that predates the tunnel (here: a plain grpcio server answering Hash and
    health) answers UNIMPLEMENTED to it; the balancer then sends it calls of their own."""
    from grpc_health.v1 import health, health_pb2_grpc

    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        data = hash_pb2.HashRequest.FromString(request).data
        return hash_pb2.HashResponse(
            result=common_pb2.HashResult(encoded=hashlib.sha256(data).hexdigest())
        ).SerializeToString()

    class Plain(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return grpc.unary_unary_rpc_method_handler(answer) if details.method == HASH else None

    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers([Plain()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        replica = SimpleNamespace(address=f"127.0.0.1:{port}")  # all start_balancer reads
        balancer = start_balancer(tmp_path, [replica])  # type: ignore[list-item]
        try:
            with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
                stub = hash_pb2_grpc.HashServiceStub(channel)
                for data in (b"abc", b"abd", b"abe"):
                    assert (
                        stub.Hash(_hash(data), timeout=10).result.encoded
                        == hashlib.sha256(data).hexdigest()
                    )
        finally:
            balancer.terminate()
    finally:
        server.stop(0)


def test_a_call_id_in_use_is_refused_so_the_replica_runs_one_task_per_id(
    mesh: tuple[Proc, list[Proc]],
) -> None:
    _, backends = mesh
    request = _hash(b"abc").SerializeToString()
    slow = encode_call(5, HASH, (("x-test-sleep", "0.5"),), 5.0, request)
    copies = b"".join(encode_call(5, HASH, (), 5.0, request) for _ in range(50))
    with grpc.insecure_channel(backends[0].address) as channel:
        stream = channel.stream_stream(TUNNEL_METHOD)(iter([slow + copies]), timeout=10)
        replies = [r for message in stream for r in decode_replies(message)]
    codes = [r.code for r in replies]
    assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 50 and codes[-1] is grpc.StatusCode.OK

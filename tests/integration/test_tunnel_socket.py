"""The tunnel's socket carrier: calls ride it with their semantics once the stream offered it,
its end fails the calls in it as the stream's end does, and nobody without a token from an
authenticated stream gets a call through it (wrong tokens, replays, floods of handshakes,
oversized messages: each from another address)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from hashmesh.balancer.tunnel import LOST, Tunnel
from hashmesh.core import tunnel_socket
from hashmesh.core.rpc import GrpcServer
from hashmesh.core.tls import ServerTls
from hashmesh.core.tunnel import (
    ADVERTISE,
    TUNNEL_METHOD,
    TunnelServer,
    decode_replies,
    encode_call,
)
from hashmesh.v1 import hash_pb2, hash_pb2_grpc
from tests import balancer_backends
from tests.certs import make_pki

HASH = "/hashmesh.v1.HashService/Hash"


def _request(data: bytes) -> bytes:
    return bytes(hash_pb2.HashRequest(algorithm=1, data=data).SerializeToString())  # type: ignore[arg-type]


async def _with_replica(
    body: Callable[[GrpcServer, Tunnel], Awaitable[None]],
    *,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    server = GrpcServer("127.0.0.1:0", credentials=credentials)
    server.add(
        hash_pb2_grpc.add_HashServiceServicer_to_server,
        "hashmesh.v1.HashService",
        balancer_backends.TestHashService(balancer_backends.Behaviour("r1", 0.0)),
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    tunnel = Tunnel(channel, 4 * 1024 * 1024, "127.0.0.1")
    try:
        await body(server, tunnel)
    finally:
        tunnel.close()
        await channel.close()
        await server.stop(0)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def _printed(capsys: pytest.CaptureFixture[str], line: str) -> None:
    seen = ""
    while line not in seen:
        seen += capsys.readouterr().out
        await asyncio.sleep(0.01)


async def _socket_up(tunnel: Tunnel) -> None:
    # The first call opens the stream; the socket follows the stream's offer.
    reply = await tunnel.unary(HASH, (), 10, _request(b"warm"))
    assert reply.code is grpc.StatusCode.OK
    await asyncio.wait_for(_until(lambda: tunnel._socket is not None), 10)


def _listener(server: GrpcServer) -> tunnel_socket.SocketListener:
    assert isinstance(server.tunnel, TunnelServer) and server.tunnel.socket is not None
    return server.tunnel.socket


def test_calls_ride_the_socket_with_metadata_deadline_status_and_cancellation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def body(server: GrpcServer, tunnel: Tunnel) -> None:
        await _socket_up(tunnel)
        reply = await tunnel.unary(HASH, (("x-client-id", "bob"),), 3.5, _request(b"abc"))
        trailing = dict(reply.trailing)
        assert reply.code is grpc.StatusCode.OK and trailing["x-path"] == "tunnel"
        assert hash_pb2.HashResponse.FromString(reply.payload).result.encoded.startswith("ba7816bf")
        assert dict(reply.initial)["x-initial"] == "r1"
        assert trailing["x-seen-client-id"] == "bob"
        # The deadline arrived (less what the hop took, which load can stretch).
        assert 0.0 < float(trailing["x-remaining"]) <= 3.6
        rich = await tunnel.unary(HASH, (("x-test-error", "rich"),), 5, _request(b"x"))
        assert rich.code is grpc.StatusCode.INVALID_ARGUMENT
        assert dict(rich.trailing)["x-custom"] == "kept"
        assert any(key == "grpc-status-details-bin" for key, _ in rich.trailing)
        late = await tunnel.unary(HASH, (("x-test-sleep", "5"),), 0.2, _request(b"x"))
        assert late.code is grpc.StatusCode.DEADLINE_EXCEEDED
        # A caller that gives up cancels the replica's handler through the socket.
        slow = asyncio.ensure_future(
            tunnel.unary(HASH, (("x-test-sleep", "30"),), 60, _request(b"x"))
        )
        await asyncio.wait_for(_printed(capsys, "sleeping Hash"), 10)
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        await asyncio.wait_for(_printed(capsys, "cancelled Hash"), 10)
        assert tunnel._socket is not None  # the socket outlives a cancelled call

    asyncio.run(_with_replica(body))


def test_the_socket_closing_fails_its_calls_as_lost_and_the_next_call_reopens(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def body(server: GrpcServer, tunnel: Tunnel) -> None:
        await _socket_up(tunnel)
        capsys.readouterr()
        slow = asyncio.ensure_future(
            tunnel.unary(HASH, (("x-test-sleep", "30"),), 60, _request(b"x"))
        )
        await asyncio.wait_for(_printed(capsys, "sleeping Hash"), 10)  # it reached the replica
        socket_end = tunnel._socket
        assert socket_end is not None
        socket_end.close()
        reply = await asyncio.wait_for(slow, 10)
        assert reply.code is grpc.StatusCode.UNAVAILABLE and reply.details.startswith(LOST)
        again = await tunnel.unary(HASH, (), 10, _request(b"abc"))
        assert again.code is grpc.StatusCode.OK

    asyncio.run(_with_replica(body))


async def _raw(port: int, payload: bytes, source: str = "127.0.0.2") -> bytes:
    """What the replica's socket answers a stranger sending ``payload`` (b"" once closed)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    try:
        await loop.sock_sendall(sock, payload)
        return await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
    finally:
        sock.close()


async def _offer(address: str) -> tuple[grpc.aio.Channel, object, int, bytes]:
    """Open a tunnel stream as a balancer would and read the socket it is offered."""
    channel = grpc.aio.insecure_channel(address)
    stream = channel.stream_stream(TUNNEL_METHOD)()
    for key, value in await stream.initial_metadata():
        offer = tunnel_socket.parse_advert(value) if key == ADVERTISE else None
        if offer is not None:
            return channel, stream, *offer
    raise AssertionError("no socket offered")


def test_a_stranger_gets_nothing_through_the_socket() -> None:
    async def body(server: GrpcServer, tunnel: Tunnel) -> None:
        await _socket_up(tunnel)
        port = _listener(server).port
        # A wrong token, junk, a length over the limit: closed at once, no call runs.
        assert await _raw(port, tunnel_socket.pack(bytes(32))) == b""
        assert await _raw(port, tunnel_socket.pack(b"junk")) == b""
        assert await _raw(port, struct.pack("<I", 1 << 30)) == b""
        # A token works once: a second connection showing it (a replay) is closed.
        channel, _stream, port, token = await _offer(server.address)  # the stream holds the grant
        loop = asyncio.get_running_loop()
        first = socket.socket()
        first.setblocking(False)
        try:
            await loop.sock_connect(first, ("127.0.0.1", port))
            await loop.sock_sendall(first, tunnel_socket.pack(token))
            frame = encode_call(7, HASH, (), 5.0, _request(b"abc"))
            await loop.sock_sendall(first, tunnel_socket.pack(frame))
            reader = tunnel_socket.MessageReader(1 << 20)
            messages: list[bytes] = []
            while len(messages) < 2:  # the empty acceptance, then the reply
                messages += reader.feed(await asyncio.wait_for(loop.sock_recv(first, 65536), 10))
            assert messages[0] == b""
            (reply,) = decode_replies(messages[1])
            assert reply.call_id == 7 and reply.code is grpc.StatusCode.OK
            assert await _raw(port, tunnel_socket.pack(token)) == b""
        finally:
            first.close()
            await channel.close()
        # The balancer's own socket is untouched by all this.
        reply = await tunnel.unary(HASH, (), 10, _request(b"abc"))
        assert reply.code is grpc.StatusCode.OK and tunnel._socket is not None

    asyncio.run(_with_replica(body))


def test_handshakes_are_bounded() -> None:
    async def body(server: GrpcServer, tunnel: Tunnel) -> None:
        listener = _listener(server)
        loop = asyncio.get_running_loop()
        held = []
        for _ in range(tunnel_socket.MAX_HANDSHAKES):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", listener.port))
            held.append(sock)
        await asyncio.wait_for(
            _until(lambda: listener.handshaking == tunnel_socket.MAX_HANDSHAKES), 10
        )
        try:
            # One more waiting connection is closed at once, and the balancer's calls keep
            # flowing on the stream meanwhile.
            assert await _raw(listener.port, b"") == b""
            reply = await tunnel.unary(HASH, (), 10, _request(b"abc"))
            assert reply.code is grpc.StatusCode.OK
            # The strangers are dropped when their time is up; the next tunnel gets its socket.
            await asyncio.wait_for(_until(lambda: listener.handshaking == 0), 30)
            tunnel.close()
            await _socket_up(tunnel)
        finally:
            for sock in held:
                sock.close()

    asyncio.run(_with_replica(body))


def test_a_tls_replica_offers_no_plaintext_socket(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ServerTls(cert_file=str(pki.server_cert), key_file=str(pki.server_key))

    async def body(server: GrpcServer, tunnel: Tunnel) -> None:
        assert server.tunnel.socket is None

    asyncio.run(_with_replica(body, credentials=tls.credentials()))


def test_a_replica_on_a_unix_socket_keeps_the_calls_on_the_stream(tmp_path: Path) -> None:
    async def run() -> None:
        path = tmp_path / "replica.sock"
        server = GrpcServer(f"unix:{path}")
        server.add(
            hash_pb2_grpc.add_HashServiceServicer_to_server,
            "hashmesh.v1.HashService",
            balancer_backends.TestHashService(balancer_backends.Behaviour("r1", 0.0)),
        )
        await server.start()
        channel = grpc.aio.insecure_channel(f"unix:{path}")
        tunnel = Tunnel(channel, 4 * 1024 * 1024, "unix")
        try:
            assert _listener(server).port == 0  # no socket offered
            reply = await tunnel.unary(HASH, (), 10, _request(b"abc"))
            assert reply.code is grpc.StatusCode.OK and tunnel._socket is None
        finally:
            tunnel.close()
            await channel.close()
            await server.stop(0)

    asyncio.run(run())

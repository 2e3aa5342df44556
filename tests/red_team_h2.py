"""A bare HTTP/2 gRPC client (the ``h2`` package) for tests that send what grpcio refuses to:
non-ASCII metadata values, upper-case keys. One unary call per connection."""

from __future__ import annotations

import socket
import struct

import h2.config
import h2.connection
import h2.events


def unary(
    address: str,
    path: str,
    message: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    timeout: float = 10.0,
) -> dict[bytes, bytes]:
    """Response headers and trailers of one call (``grpc-status``, ``grpc-message``, ...)."""
    host, port = address.rsplit(":", 1)
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    request = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", address.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    conn.send_headers(1, request + headers)
    conn.send_data(1, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
    seen: dict[bytes, bytes] = {}
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(conn.data_to_send())
        while b"grpc-status" not in seen:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed before the call ended: {seen}")
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    seen.update(dict(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise ConnectionError(f"call reset: {event!r}")
            sock.sendall(conn.data_to_send())
    return seen

"""A hostile gRPC client on raw HTTP/2 (the ``h2`` package): it binds to the loopback address
it is given (127.0.0.2, 127.0.0.3 … are distinct peers to the server), opens streams and
sends exactly what a test asks, including what grpc's own client never would (headers
only, non-ASCII metadata). A reader thread records each stream's headers and trailers."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from google.rpc import status_pb2


def grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class StreamResult:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.ended = threading.Event()
        self.reset = False

    @property
    def status(self) -> int | None:
        raw = self.trailers.get("grpc-status") or self.headers.get("grpc-status")
        return None if raw is None else int(raw)

    @property
    def message(self) -> str:
        return self.trailers.get("grpc-message") or self.headers.get("grpc-message", "")

    def details(self) -> status_pb2.Status | None:
        raw = self.trailers.get("grpc-status-details-bin") or self.headers.get(
            "grpc-status-details-bin"
        )
        if raw is None:
            return None
        return status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))


class RawConnection:
    """One HTTP/2 connection from ``source`` to ``address`` (``host:port``)."""

    def __init__(self, address: str, source: str, timeout: float = 10.0) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection(
            (host, int(port)), timeout=timeout, source_address=(source, 0)
        )
        self.sock.settimeout(None)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self._lock = threading.Lock()
        self.results: dict[int, StreamResult] = {}
        self.closed = threading.Event()
        self.settings_received = threading.Event()
        with self._lock:
            self.conn.initiate_connection()
            self.sock.sendall(self.conn.data_to_send())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                with self._lock:
                    events = self.conn.receive_data(data)
                    for event in events:
                        self._on(event)
                    outgoing = self.conn.data_to_send()
                if outgoing:
                    self.sock.sendall(outgoing)
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
            for result in self.results.values():
                result.ended.set()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received.set()
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            result = self.results.get(event.stream_id)
            if result is not None:
                target = (
                    result.headers
                    if isinstance(event, h2.events.ResponseReceived)
                    else result.trailers
                )
                target.update({str(k): str(v) for k, v in event.headers})
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            result = self.results.get(event.stream_id)
            if result is not None:
                result.ended.set()
        elif isinstance(event, h2.events.StreamReset):
            result = self.results.get(event.stream_id)
            if result is not None:
                result.reset = True
                result.ended.set()

    def open(
        self,
        method: str,
        metadata: Sequence[tuple[str, str]] = (),
        message: bytes | None = None,
        end: bool = False,
    ) -> StreamResult:
        """Send the headers of a call to ``method`` (and ``message``, and end-of-stream if asked)."""
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "hashmesh"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        with self._lock:
            stream_id = self.conn.get_next_available_stream_id()
            result = self.results[stream_id] = StreamResult()
            self.conn.send_headers(stream_id, headers, end_stream=end and message is None)
            if message is not None:
                self.conn.send_data(stream_id, grpc_frame(message), end_stream=end)
            outgoing = self.conn.data_to_send()
        self.sock.sendall(outgoing)
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


def hold_streams(
    address: str,
    source: str,
    method: str,
    count: int,
    *,
    per_connection: int = 400,
    message: bytes | None = None,
    end: bool = False,
) -> tuple[list[RawConnection], list[StreamResult]]:
    """Open ``count`` streams of ``method`` from ``source``, ``per_connection`` per connection
    (under the server's MAX_CONCURRENT_STREAMS), and leave them open."""
    connections: list[RawConnection] = []
    results: list[StreamResult] = []
    while len(results) < count:
        connection = RawConnection(address, source)
        connection.settings_received.wait(10)
        connections.append(connection)
        for _ in range(min(per_connection, count - len(results))):
            results.append(connection.open(method, message=message, end=end))
    return connections, results


def wait_answered(results: Sequence[StreamResult], expected: int, timeout: float = 60.0) -> int:
    """Wait until ``expected`` of ``results`` have ended; returns how many have."""
    deadline = time.monotonic() + timeout
    while True:
        done = sum(1 for r in results if r.ended.is_set())
        if done >= expected or time.monotonic() > deadline:
            return done
        time.sleep(0.05)

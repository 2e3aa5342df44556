"""Attack 3: inventing method names. Each distinct unknown name is forwarded and answered
UNIMPLEMENTED, and no table of the balancer or of a replica keeps it: memory stays flat.
Before, each name cost the balancer about 20 KiB and a replica about 4 KiB (60,000 names:
+1.1 GiB), so 10,000 names staying under 10 MiB tells the two apart with a wide margin; the
README gives the 50,000-name figure (bench command there)."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from tests.conftest import Processes

pytestmark = pytest.mark.timeout(240)

MIB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def call_unknown_methods(
    address: str, first: int, count: int, in_flight: int = 16
) -> dict[grpc.StatusCode, int]:
    """``count`` calls, each to a method name never used before; their statuses, counted.
    Fewer in flight than the peer's budget of other streams: unknown names are forwarded as those."""
    codes: dict[grpc.StatusCode, int] = {}
    lock = threading.Lock()
    slots = threading.Semaphore(in_flight)
    with grpc.insecure_channel(address) as channel:

        def done(future: grpc.Future) -> None:
            code = future.code()
            with lock:
                codes[code] = codes.get(code, 0) + 1
            slots.release()

        for index in range(first, first + count):
            slots.acquire()
            call = channel.unary_unary(f"/hashmesh.v1.HashService/Invented{index}")
            call.future(b"", timeout=30).add_done_callback(done)
        for _ in range(in_flight):
            slots.acquire()
    return codes


NAMES = 15_000
WARM_UP = 5_000


def test_invented_method_names_keep_memory_flat(dsn: str, procs: Processes) -> None:
    replica = procs.hashd(dsn)
    balancer = procs.balancer([replica.address])
    address = balancer.addresses["balancer"]
    # Warm up at the same concurrency: allocator arenas, grpc's pools and the high-water mark of
    # calls in flight (which a loaded machine raises) are reached before measuring.
    call_unknown_methods(address, 0, WARM_UP)
    balancer_before, replica_before = rss(balancer.pid), rss(replica.pid)
    codes = call_unknown_methods(address, WARM_UP, NAMES)
    assert codes == {grpc.StatusCode.UNIMPLEMENTED: NAMES}
    balancer_growth, replica_growth = (
        rss(balancer.pid) - balancer_before,
        rss(replica.pid) - replica_before,
    )
    # Caching every name cost ~1.7 KiB a name (25 MiB for these 15,000); flat stays well under half.
    assert balancer_growth < 12 * MIB, f"balancer grew {balancer_growth / MIB:.1f} MiB"
    assert replica_growth < 12 * MIB, f"replica grew {replica_growth / MIB:.1f} MiB"

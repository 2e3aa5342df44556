"""Attack 3: inventing method names. Each distinct unknown name is forwarded and answered
UNIMPLEMENTED, and no table of the balancer or of a replica keeps it: memory stays flat.
Before, each name cost the balancer about 20 KiB and a replica about 4 KiB (60,000 names:
+1.1 GiB); 15,000 names costing under 12 MiB more than as many calls to one name tells the two
apart with a wide margin; the README gives the 50,000-name figure (bench command there)."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from tests.conftest import Processes

pytestmark = pytest.mark.timeout(420)

MIB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def call_unknown_methods(
    address: str, first: int, count: int, in_flight: int = 16, *, distinct: bool = True
) -> dict[grpc.StatusCode, int]:
    """``count`` calls, each to a method name never used before (or all to name ``first`` when
    not ``distinct``); their statuses, counted. Fewer in flight than the peer's budget of other
    streams: unknown names are forwarded as those."""
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
            name = index if distinct else first
            call = channel.unary_unary(f"/hashmesh.v1.HashService/Invented{name}")
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
    # The control: as many calls, all to one unknown name. What a loaded machine adds to the
    # processes' memory (seen up to ~14 MiB for 15,000 calls) shows here as well, so only what
    # the distinct names cost on top of it is counted.
    before = rss(balancer.pid), rss(replica.pid)
    codes = call_unknown_methods(address, WARM_UP, NAMES, distinct=False)
    assert codes == {grpc.StatusCode.UNIMPLEMENTED: NAMES}
    middle = rss(balancer.pid), rss(replica.pid)
    codes = call_unknown_methods(address, WARM_UP + 1, NAMES)
    assert codes == {grpc.StatusCode.UNIMPLEMENTED: NAMES}
    after = rss(balancer.pid), rss(replica.pid)
    for name, i in (("balancer", 0), ("replica", 1)):
        control, distinct = middle[i] - before[i], after[i] - middle[i]
        # Caching every name cost ~1.7 KiB a name (25 MiB for these 15,000); flat stays well
        # under half of that above the control.
        assert distinct - max(control, 0) < 12 * MIB, (
            f"{name} grew {distinct / MIB:.1f} MiB for {NAMES} names, "
            f"{control / MIB:.1f} MiB for as many calls to one name"
        )

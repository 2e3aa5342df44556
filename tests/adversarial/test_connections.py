"""Attack 2: a flood of idle connections. The public listener accepts at most its cap (the
rest are closed at once), idle connections are closed after the idle limit, the admin
listener keeps its own cap, and the process's descriptor limit is raised to the hard one."""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import grpc
import pytest

from tests.adversarial.raw_h2 import RawConnection
from tests.adversarial.victim import admin_answers, hash_codes, ok_share
from tests.conftest import Processes
from tests.procs import start_process

pytestmark = pytest.mark.timeout(120)

CAP = 150
FLOOD = 250


def _closed(connections: list[RawConnection]) -> int:
    return sum(1 for c in connections if c.closed.is_set())


def _wait_closed(connections: list[RawConnection], count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while _closed(connections) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return _closed(connections)


def test_idle_connection_flood_leaves_admin_and_others_served(procs: Processes) -> None:
    backend = start_process(
        "testbackend", ["tests.balancer_backends"], log_dir=procs.log_dir, expect=("testbackend",)
    )
    procs.started.append(backend)
    balancer = procs.balancer(
        [backend.address],
        env={
            "HASHMESH_BALANCER_MAX_CONNECTIONS": str(CAP),
            "HASHMESH_BALANCER_CONNECTION_IDLE_SECONDS": "2",
        },
    )
    address = balancer.addresses["balancer"]
    flood = []
    try:
        for _ in range(FLOOD):  # HTTP/2 preface and SETTINGS, then nothing
            flood.append(RawConnection(address, "127.0.0.2"))
        # The operator gets in meanwhile.
        assert admin_answers(balancer.addresses["balancer admin"])
        # Idle: every one of them is closed by the server, none by us.
        assert _wait_closed(flood, FLOOD, timeout=60) == FLOOD
        # Over the cap: closed at accept, before the server's HTTP/2 SETTINGS.
        refused = sum(1 for c in flood if not c.settings_received.is_set())
        assert FLOOD - CAP <= refused <= FLOOD - CAP + 2  # a health probe may still hold one
        assert ok_share(hash_codes(address, 50)) == 1.0
    finally:
        for connection in flood:
            connection.close()
    assert admin_answers(balancer.addresses["balancer admin"])


def test_a_client_stream_that_sends_nothing_ends_with_a_clear_status(procs: Processes) -> None:
    backend = start_process(
        "testbackend", ["tests.balancer_backends"], log_dir=procs.log_dir, expect=("testbackend",)
    )
    procs.started.append(backend)
    balancer = procs.balancer([backend.address], env={"HASHMESH_BALANCER_STREAM_IDLE_SECONDS": "1"})
    connection = RawConnection(balancer.addresses["balancer"], "127.0.0.2")
    try:
        held = connection.open("/hashmesh.v1.HashService/HashStream")  # headers, then silence
        assert held.ended.wait(30)
        assert held.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], held.trailers
        assert "sent no message for 1 s" in held.message
    finally:
        connection.close()
    assert "Traceback" not in balancer.log()


def test_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256)
    script = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({lowered}, {hard}))\n"
        "from hashmesh.balancer.connections import ConnectionSettings, raise_fd_limit\n"
        "limit = raise_fd_limit()\n"
        "print(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0],"
        " ConnectionSettings(max_connections=10**9).fitted(limit).max_connections)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    reported, in_force, fitted = (int(x) for x in out.stdout.split())
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert reported == in_force == expected
    assert fitted < in_force  # room kept for the admin listener and the replicas

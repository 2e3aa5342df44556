"""Starting and stopping real hashmesh processes for tests.

Every daemon prints ``<name> listening on HOST:PORT`` on stdout once it serves; these helpers
start it with port 0, read that line, and stop it by PID (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

IDENTITY_SECRET = os.environ.setdefault(
    "HASHMESH_IDENTITY_SECRET", "hashmesh-tests-identity-secret"
)
"""Every balancer and hashd a test starts inherits it (the daemons refuse to start without one);
tests that play the balancer sign with it (``tests.stamps``)."""

# "hashd listening on 127.0.0.1:4321", "balancer admin listening on ...", "workerd ready as w-1"
_LISTENING = re.compile(r"^(?P<name>[\w -]+?) (?:listening on|ready as) (?P<address>\S+)$")


@dataclass
class Proc:
    """A daemon started by a test. ``addresses`` maps each ``X listening on`` name to its address."""

    name: str
    popen: subprocess.Popen[str]
    log_path: Path
    addresses: dict[str, str] = field(default_factory=dict)
    pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        return next(iter(self.addresses.values()))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL when it does not exit in ``timeout``. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._drained()
        return int(self.popen.returncode)

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        self._drained()

    def _drained(self) -> None:
        """Wait for the output pump to reach end of file (it closes the pipe)."""
        if self.pump is not None:
            self.pump.join(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: dict[str, str] | None = None,
    expect: Sequence[str] = (),
    timeout: float = 30.0,
) -> Proc:
    """Run ``python -m <argv>`` and wait until it has printed every ``<x> listening on`` line
    named in ``expect`` (default: any one)."""
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen(
        [sys.executable, "-m", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    proc = Proc(name=name, popen=popen, log_path=log_path)
    ready = threading.Event()
    wanted = set(expect)

    def pump() -> None:
        assert popen.stdout is not None
        with open(log_path, "a", encoding="utf-8") as sink:
            for line in popen.stdout:
                sink.write(line)
                sink.flush()
                match = _LISTENING.match(line.strip())
                if match:
                    proc.addresses[match.group("name")] = match.group("address")
                    if not wanted or wanted <= set(proc.addresses):
                        ready.set()
        popen.stdout.close()
        ready.set()

    proc.pump = threading.Thread(target=pump, daemon=True)
    proc.pump.start()
    if (
        not ready.wait(timeout)
        or not proc.addresses
        or (wanted and not wanted <= set(proc.addresses))
    ):
        proc.kill()
        raise RuntimeError(f"{name} did not start in {timeout}s:\n{proc.log()[-4000:]}")
    return proc


def wait_serving(address: str, service: str = "", timeout: float = 20.0) -> None:
    """Block until grpc.health.v1 at ``address`` answers SERVING for ``service``."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            time.sleep(0.05)

"""deploy/healthcheck.py, the image's HEALTHCHECK, run as a process against a real GrpcServer:
exit 0 while SERVING, 1 once NOT_SERVING or unreachable, and it speaks mutual TLS from the
HASHMESH_TLS_* variables."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from hashmesh.core.rpc import GrpcServer
from hashmesh.core.tls import ServerTls
from tests.certs import make_pki

PROBE = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"
TLS_VARIABLES = (
    "CERT_FILE",
    "KEY_FILE",
    "CLIENT_CA_FILE",
    "CA_FILE",
    "CLIENT_CERT_FILE",
    "CLIENT_KEY_FILE",
    "SERVER_NAME",
)


async def probe(target: str, env: dict[str, str] | None = None) -> int:
    clean = {
        k: v for k, v in os.environ.items() if k.removeprefix("HASHMESH_TLS_") not in TLS_VARIABLES
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        target,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), timeout=30)


def test_probe_follows_the_serving_status() -> None:
    async def scenario() -> None:
        server = GrpcServer("127.0.0.1:0")
        await server.start()
        try:
            await server.set_serving(True)
            assert await probe(server.address) == 0
            await server.set_serving(False)
            assert await probe(server.address) == 1
        finally:
            await server.stop(0)
        assert await probe(server.address) == 1

    asyncio.run(scenario())


def test_probe_speaks_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), client_ca_file=str(pki.ca_cert))

    async def scenario() -> None:
        server = GrpcServer("127.0.0.1:0", credentials=tls.credentials())
        await server.start()
        await server.set_serving(True)
        try:
            with_cert = {
                "HASHMESH_TLS_CA_FILE": str(pki.ca_cert),
                "HASHMESH_TLS_CLIENT_CERT_FILE": str(pki.client_cert),
                "HASHMESH_TLS_CLIENT_KEY_FILE": str(pki.client_key),
            }
            assert await probe(server.address, with_cert) == 0
            assert await probe(server.address, {"HASHMESH_TLS_CA_FILE": str(pki.ca_cert)}) == 1
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_liveness_stays_serving_while_the_server_cannot_serve() -> None:
    async def scenario() -> None:
        server = GrpcServer("127.0.0.1:0")
        await server.start()
        try:
            await server.set_serving(False)  # e.g. draining, or its database gone
            assert await probe(server.address) == 1
            assert await probe_args(server.address, "--liveness") == 0
        finally:
            await server.stop(0)
        assert await probe_args(server.address, "--liveness") == 1  # a dead process is not alive

    asyncio.run(scenario())


async def probe_args(*args: str, env: dict[str, str] | None = None) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), timeout=30)


def test_a_balancer_without_ready_replicas_is_alive_but_not_ready(tmp_path: Path) -> None:
    """What the Kubernetes probes ask: readiness on the public port follows the replicas,
    liveness (on either listener) only the process, so no replica ready restarts nothing."""
    from hashmesh.core.queue.embedded_pg import free_port
    from tests.procs import start_process

    dead = f"127.0.0.1:{free_port()}"
    balancer = start_process(
        "balancer",
        [
            "hashmesh.balancer",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backends",
            dead,
        ],
        log_dir=tmp_path,
        env={"HASHMESH_BALANCER_HEALTH_INTERVAL": "0.2"},
        expect=("balancer", "balancer admin"),
    )
    try:
        public, admin = balancer.addresses["balancer"], balancer.addresses["balancer admin"]
        assert asyncio.run(probe_args(public)) == 1
        assert asyncio.run(probe_args(public, "--liveness")) == 0
        assert asyncio.run(probe_args(admin, "--liveness")) == 0
    finally:
        balancer.terminate()
